#include "eval/rankmap.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/threads.h"

namespace dk {

double RankMap::MeanRank(int t) const {
  const size_t T = pieces.size();
  double s = 0.0;
  for (int l = 0; l < n_layer; ++l) s += rk[l * T + t] + rv[l * T + t];
  return s / (2.0 * n_layer);
}

StatusOr<RankMap> CollectRankMap(const Model& model, const std::vector<int32_t>& tokens, DynaKvCache& cache,
                                 int n_batch, ThreadPool& pool) {
  const int T = static_cast<int>(tokens.size());
  if (T < 1) return InvalidArgument("rankmap: empty text");
  if (T > cache.capacity())
    return InvalidArgument("rankmap: " + std::to_string(T) + " tokens do not fit a cache of " +
                           std::to_string(cache.capacity()));
  cache.Clear();
  n_batch = std::clamp(n_batch, 1, T);
  ForwardState st(model.config(), n_batch);
  std::vector<float> logits(model.config().n_vocab);
  for (int b = 0; b < T; b += n_batch) {
    const int n = std::min(n_batch, T - b);
    DK_RETURN_IF_ERROR(model.Forward(tokens.data() + b, n, cache, st, logits.data(), false, pool));
  }
  RankMap m;
  m.levels = cache.profile().levels;
  m.D = cache.shape().kv_dim();
  m.n_layer = cache.shape().n_layer;
  m.rk.resize(static_cast<size_t>(m.n_layer) * T);
  m.rv.resize(m.rk.size());
  for (int l = 0; l < m.n_layer; ++l)
    for (int t = 0; t < T; ++t) {
      const TokenRanks r = cache.Ranks(l, t);
      m.rk[static_cast<size_t>(l) * T + t] = r.r_k;
      m.rv[static_cast<size_t>(l) * T + t] = r.r_v;
    }
  for (int32_t id : tokens) m.pieces.push_back(model.tokenizer().TokenToPiece(id));
  m.kv_fraction = static_cast<double>(cache.BytesUsed()) / (static_cast<double>(Fp16FullBytesPerToken(cache.shape())) * T);
  return m;
}

namespace {

std::string Escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default:
        if (c < 0x20 && c != '\n' && c != '\t') {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\x%02x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

// Position of rank r on the colour scale: log-rank, 0 at rank 1, 1 at rank D.
double Shade(double r, int D) { return D > 1 ? std::log(std::max(r, 1.0)) / std::log(static_cast<double>(D)) : 1.0; }

// Light yellow (few dimensions kept) through teal to deep blue (all of them).
std::string Colour(double t) {
  static const double stops[3][3] = {{255, 247, 214}, {120, 190, 200}, {31, 78, 156}};
  t = std::clamp(t, 0.0, 1.0) * 2.0;
  const int i = std::min(1, static_cast<int>(t));
  const double f = t - i;
  char buf[16];
  std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", static_cast<int>(stops[i][0] + f * (stops[i + 1][0] - stops[i][0])),
                static_cast<int>(stops[i][1] + f * (stops[i + 1][1] - stops[i][1])),
                static_cast<int>(stops[i][2] + f * (stops[i + 1][2] - stops[i][2])));
  return buf;
}

// One layer's histogram: for each level, the share of tokens whose K (blue) and V (orange) rank it is.
std::string Histogram(const RankMap& m, int layer) {
  const size_t T = m.pieces.size(), L = m.levels.size();
  std::vector<int> ck(L, 0), cv(L, 0);
  for (size_t t = 0; t < T; ++t) {
    for (size_t j = 0; j < L; ++j) {
      ck[j] += m.rk[layer * T + t] == m.levels[j];
      cv[j] += m.rv[layer * T + t] == m.levels[j];
    }
  }
  const double w = 260, h = 130, pad = 18, bw = (w - 2 * pad) / static_cast<double>(L);
  std::ostringstream s;
  s << "<figure><svg width=\"" << w << "\" height=\"" << h + 22 << "\" role=\"img\" aria-label=\"layer " << layer
    << " ranks\">";
  s << "<line x1=\"" << pad << "\" y1=\"" << h << "\" x2=\"" << w - pad << "\" y2=\"" << h
    << "\" stroke=\"#999\"/>";
  for (size_t j = 0; j < L; ++j) {
    const double x = pad + j * bw;
    const double hk = (h - 10) * ck[j] / static_cast<double>(T), hv = (h - 10) * cv[j] / static_cast<double>(T);
    s << "<rect x=\"" << x + 1 << "\" y=\"" << h - hk << "\" width=\"" << bw / 2 - 1 << "\" height=\"" << hk
      << "\" fill=\"#2f6db5\"><title>K rank " << m.levels[j] << ": " << ck[j] << " tokens</title></rect>";
    s << "<rect x=\"" << x + bw / 2 << "\" y=\"" << h - hv << "\" width=\"" << bw / 2 - 1 << "\" height=\"" << hv
      << "\" fill=\"#e08a2c\"><title>V rank " << m.levels[j] << ": " << cv[j] << " tokens</title></rect>";
    s << "<text x=\"" << x + bw / 2 << "\" y=\"" << h + 14 << "\" font-size=\"9\" text-anchor=\"middle\">"
      << m.levels[j] << "</text>";
  }
  s << "</svg><figcaption>layer " << layer << "</figcaption></figure>";
  return s.str();
}

}  // namespace

std::string RankMapHtml(const RankMap& m) {
  const size_t T = m.pieces.size();
  std::ostringstream s;
  s << "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>DynaKV rank map</title>\n<style>\n"
       "body{font-family:system-ui,-apple-system,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}\n"
       "h1{font-size:22px;margin-bottom:4px} .meta{color:#555;margin-top:0}\n"
       ".controls{margin:12px 0;display:flex;gap:24px;align-items:center;flex-wrap:wrap}\n"
       ".legend{display:flex;align-items:center;gap:8px;font-size:13px;color:#444}\n"
       ".bar{width:220px;height:14px;border:1px solid #ccc;background:linear-gradient(90deg,"
    << Colour(0) << "," << Colour(0.5) << "," << Colour(1)
    << ")}\n"
       ".text{font-family:Georgia,serif;font-size:17px;line-height:2;white-space:pre-wrap;border:1px solid #ddd;"
       "padding:14px;border-radius:6px}\n"
       ".text span{border-radius:3px;padding:2px 0}\n"
       ".hist{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0} figcaption{text-align:center;font-size:13px}\n"
       ".key{font-size:13px;color:#444}\n</style></head><body>\n";
  s << "<h1>DynaKV rank map</h1>\n<p class=\"meta\">" << Escape(m.title) << "<br>" << T
    << " tokens; measured cache fraction " << std::fixed;
  s.precision(4);
  s << m.kv_fraction << " of the fp16 full cache; full rank D = " << m.D
    << ". Darker = more latent dimensions kept (log scale). Hover a token for its ranks in every layer.</p>\n";
  s << "<div class=\"controls\"><div>Show: <label><input type=\"radio\" name=\"kv\" value=\"kv\" checked> K and V"
       "</label> <label><input type=\"radio\" name=\"kv\" value=\"k\"> keys</label> <label><input type=\"radio\" "
       "name=\"kv\" value=\"v\"> values</label></div><div>Layer: <select id=\"layer\"><option value=\"-1\">mean of "
       "layers</option>";
  for (int l = 0; l < m.n_layer; ++l) s << "<option value=\"" << l << "\">" << l << "</option>";
  s << "</select></div><div class=\"legend\">rank 1 <span class=\"bar\"></span> rank " << m.D << "</div></div>\n";
  s << "<div class=\"text\" id=\"text\">";
  s.precision(1);
  for (size_t t = 0; t < T; ++t) {
    std::string tip;
    for (int l = 0; l < m.n_layer; ++l)
      tip += "layer " + std::to_string(l) + ": K " + std::to_string(m.rk[l * T + t]) + ", V " +
             std::to_string(m.rv[l * T + t]) + "\n";
    const double shade = Shade(m.MeanRank(static_cast<int>(t)), m.D);
    s << "<span style=\"background:" << Colour(shade) << (shade > 0.62 ? ";color:#fff" : "") << "\" title=\""
      << Escape(tip) << "mean " << m.MeanRank(static_cast<int>(t)) << "\">" << Escape(m.pieces[t]) << "</span>";
  }
  s << "</div>\n<h2>Ranks per layer</h2>\n<p class=\"key\">Share of tokens at each rank level: "
       "<span style=\"color:#2f6db5\">&#9632; keys</span> <span style=\"color:#e08a2c\">&#9632; values</span></p>\n"
       "<div class=\"hist\">";
  for (int l = 0; l < m.n_layer; ++l) s << Histogram(m, l);
  nlohmann::json data = {{"D", m.D}, {"n_layer", m.n_layer}, {"rk", m.rk}, {"rv", m.rv}};
  std::string blob = data.dump();
  for (size_t p = 0; (p = blob.find("</", p)) != std::string::npos; p += 3) blob.replace(p, 2, "<\\/");
  s << "</div>\n<script>\nconst data = " << blob << ";\n";
  s << R"JS(const T = data.rk.length / data.n_layer;
function colour(t) {
  const stops = [[255,247,214],[120,190,200],[31,78,156]];
  t = Math.min(1, Math.max(0, t)) * 2;
  const i = Math.min(1, Math.floor(t)), f = t - i;
  return 'rgb(' + [0,1,2].map(c => Math.round(stops[i][c] + f * (stops[i+1][c] - stops[i][c]))).join(',') + ')';
}
function update() {
  const which = document.querySelector('input[name=kv]:checked').value;
  const layer = parseInt(document.getElementById('layer').value, 10);
  const spans = document.getElementById('text').children;
  for (let t = 0; t < T; t++) {
    let sum = 0, n = 0;
    for (let l = 0; l < data.n_layer; l++) {
      if (layer >= 0 && l !== layer) continue;
      if (which !== 'v') { sum += data.rk[l * T + t]; n++; }
      if (which !== 'k') { sum += data.rv[l * T + t]; n++; }
    }
    const shade = Math.log(Math.max(sum / n, 1)) / Math.log(data.D);
    spans[t].style.background = colour(shade);
    spans[t].style.color = shade > 0.62 ? '#fff' : '';
  }
}
document.querySelectorAll('input[name=kv]').forEach(e => e.addEventListener('change', update));
document.getElementById('layer').addEventListener('change', update);
</script>
</body></html>
)JS";
  return s.str();
}

std::string RankMapSummary(const RankMap& m, int min_count, int top) {
  const size_t T = m.pieces.size();
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(1);
  s << "mean rank per layer (K / V):";
  for (int l = 0; l < m.n_layer; ++l) {
    double k = 0, v = 0;
    for (size_t t = 0; t < T; ++t) {
      k += m.rk[l * T + t];
      v += m.rv[l * T + t];
    }
    s << "  " << l << ": " << k / T << " / " << v / T;
  }
  s << "\n";
  std::map<std::string, std::pair<double, int>> by_piece;
  for (size_t t = 1; t < T; ++t) {  // the BOS is not a token of the text
    auto& e = by_piece[m.pieces[t]];
    e.first += m.MeanRank(static_cast<int>(t));
    ++e.second;
  }
  std::vector<std::pair<double, std::string>> ranked;
  for (const auto& [piece, e] : by_piece)
    if (e.second >= min_count) ranked.push_back({e.first / e.second, piece});
  std::sort(ranked.begin(), ranked.end());
  auto list = [&](auto begin, auto end) {
    int n = 0;
    for (auto it = begin; it != end && n < top; ++it, ++n) s << " '" << it->second << "' " << it->first;
    s << "\n";
  };
  s << "highest mean rank (tokens seen >= " << min_count << " times):";
  list(ranked.rbegin(), ranked.rend());
  s << "lowest mean rank:";
  list(ranked.begin(), ranked.end());
  return s.str();
}

}  // namespace dk
