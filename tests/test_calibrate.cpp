// Calibration tests: the moment accumulator and the PCA step against double-precision brute force,
// a real calibration run on a small slice of tests/data/calib.txt checked against keys and values
// captured through a plain fp32 full cache, and the 'dynakv calibrate' / 'info --profile' CLI.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "core/mapped_file.h"
#include "core/threads.h"
#include "eval/calibrate.h"
#include "gguf_writer.h"
#include "kv/full_cache.h"
#include "kv/registry.h"

namespace dk {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using W = test::GgufWriter;

const std::string kModelPath = std::string(DK_TEST_DATA) + "/brown-kjv-llama-6M-f32.gguf";
const std::string kOtherModelPath = std::string(DK_TEST_DATA) + "/stories260K.gguf";
const std::string kCalibPath = std::string(DK_TEST_DATA) + "/calib.txt";
constexpr size_t kSliceBytes = 8000;  // ~2000 tokens of calib.txt: enough for 4 chunks of 128

// Mean and covariance of rows [n][D], two-pass, in double: the reference.
void BruteForceMoments(const std::vector<double>& rows, int D, std::vector<double>* mean, std::vector<double>* cov) {
  const size_t n = rows.size() / D;
  mean->assign(D, 0.0);
  cov->assign(static_cast<size_t>(D) * D, 0.0);
  for (size_t t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) (*mean)[i] += rows[t * D + i];
  for (double& m : *mean) m /= static_cast<double>(n);
  for (size_t t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j)
        (*cov)[i * D + j] += (rows[t * D + i] - (*mean)[i]) * (rows[t * D + j] - (*mean)[j]);
  for (double& c : *cov) c /= static_cast<double>(n);
}

double MaxAbs(const std::vector<double>& x) {
  double m = 0.0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}

// Checks one BasisSet against the reference moments:
// - orthonormal columns: U is LAPACK's (orthonormal to O(D * DBL_EPSILON)) rounded to float, so
//   |(U^T U - I)_ij| <= 2 * (FLT_EPSILON / 2) * sum_k |U_ki| |U_kj| <= FLT_EPSILON (Cauchy-Schwarz);
// - eigenvalues decreasing and >= 0;
// - the mean, stored as float: within half an ulp of the reference (plus double summation noise);
// - U diag(lambda) U^T reproduces the covariance: the same float-rounding argument bounds the
//   error by FLT_EPSILON * lambda_max, plus LAPACK's backward error O(D * DBL_EPSILON) * lambda_max.
void ExpectBasisMatches(const BasisSet& b, const std::vector<double>& mean, const std::vector<double>& cov, int D,
                        const std::string& what) {
  ASSERT_EQ(b.basis.size(), static_cast<size_t>(D) * D) << what;
  const double lapack = 64.0 * D * DBL_EPSILON;
  const double tol_orth = 2.0 * FLT_EPSILON + lapack;
  double worst_orth = 0.0;
  for (int i = 0; i < D; ++i) {
    for (int j = 0; j < D; ++j) {
      double g = 0.0;
      for (int k = 0; k < D; ++k) g += static_cast<double>(b.basis[k * D + i]) * b.basis[k * D + j];
      worst_orth = std::max(worst_orth, std::fabs(g - (i == j ? 1.0 : 0.0)));
    }
  }
  EXPECT_LE(worst_orth, tol_orth) << what << ": U^T U - I";

  for (int j = 0; j < D; ++j) {
    EXPECT_GE(b.eigenvalues[j], 0.0) << what << " eigenvalue " << j;
    if (j > 0) {
      EXPECT_LE(b.eigenvalues[j], b.eigenvalues[j - 1]) << what << " eigenvalue " << j;
    }
    // Sign convention: each direction's largest-magnitude component is positive.
    int arg = 0;
    for (int i = 1; i < D; ++i)
      if (std::fabs(b.basis[i * D + j]) > std::fabs(b.basis[arg * D + j])) arg = i;
    EXPECT_GT(b.basis[arg * D + j], 0.0f) << what << " direction " << j;
  }

  const double mean_scale = MaxAbs(mean);
  for (int i = 0; i < D; ++i) {
    const double tol = 0.5 * FLT_EPSILON * std::fabs(mean[i]) + 1e3 * DBL_EPSILON * mean_scale;
    EXPECT_NEAR(b.mean[i], mean[i], tol) << what << " mean " << i;
  }

  const double lambda_max = b.eigenvalues[0];
  ASSERT_GT(lambda_max, 0.0) << what;
  const double tol_cov = (2.0 * FLT_EPSILON + lapack) * lambda_max;
  double worst_cov = 0.0;
  for (int i = 0; i < D; ++i) {
    for (int j = 0; j < D; ++j) {
      double c = 0.0;
      for (int k = 0; k < D; ++k)
        c += static_cast<double>(b.basis[i * D + k]) * b.eigenvalues[k] * static_cast<double>(b.basis[j * D + k]);
      worst_cov = std::max(worst_cov, std::fabs(c - cov[i * D + j]));
    }
  }
  EXPECT_LE(worst_cov, tol_cov) << what << ": U diag(lambda) U^T - covariance (lambda_max " << lambda_max << ")";
  // The eigenvalues sum to the trace: total variance is kept.
  double trace = 0.0, sum = 0.0;
  for (int i = 0; i < D; ++i) {
    trace += cov[i * D + i];
    sum += b.eigenvalues[i];
  }
  EXPECT_NEAR(sum, trace, D * tol_cov) << what << ": sum of eigenvalues vs trace";
}

TEST(MomentAccumulator, MatchesTwoPassWithLargeOffset) {
  // Rows far from the origin (offset 1e4, spread ~1): the unshifted E[xx^T] - mu mu^T would lose
  // ~8 of double's 16 digits; the shifted accumulation must not.
  const int D = 7;
  std::mt19937 rng(42);
  std::normal_distribution<float> nf(0.0f, 1.0f);
  std::vector<float> rows;
  std::vector<double> rows_d;
  for (int t = 0; t < 300; ++t) {
    for (int i = 0; i < D; ++i) {
      const float x = 1e4f + (i + 1) * nf(rng) + (i == 3 ? rows.back() : 0.0f) * 1e-4f;
      rows.push_back(x);
      rows_d.push_back(x);
    }
  }
  MomentAccumulator acc(D);
  int t = 0;
  for (int n : {1, 5, 64, 3, 227}) {  // uneven batches, including a single row first
    acc.Add(rows.data() + static_cast<size_t>(t) * D, n);
    t += n;
  }
  ASSERT_EQ(t, 300);
  EXPECT_EQ(acc.count(), 300);
  std::vector<double> mean, cov, ref_mean, ref_cov;
  acc.Finish(&mean, &cov);
  BruteForceMoments(rows_d, D, &ref_mean, &ref_cov);
  // One-pass on shifted data: error ~ n * DBL_EPSILON * |x - shift|^2 with |x - shift| ~ a few sigma.
  const double tol = 300 * 100 * DBL_EPSILON * MaxAbs(ref_cov);
  for (int i = 0; i < D; ++i) EXPECT_NEAR(mean[i], ref_mean[i], 1e4 * 16 * DBL_EPSILON) << "mean " << i;
  for (int i = 0; i < D * D; ++i) EXPECT_NEAR(cov[i], ref_cov[i], tol) << "cov " << i / D << "," << i % D;
}

TEST(PcaBasis, KnownMatrices) {
  // diag(3, 1, 2): directions e0, e2, e1 in that order, all with a positive largest component.
  auto b = PcaBasis({0.5, -1.0, 2.0}, {3, 0, 0, 0, 1, 0, 0, 0, 2}, 3);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_THAT(b->eigenvalues, ElementsAre(3.0, 2.0, 1.0));
  EXPECT_THAT(b->basis, ElementsAre(1, 0, 0, 0, 0, 1, 0, 1, 0));
  EXPECT_THAT(b->mean, ElementsAre(0.5f, -1.0f, 2.0f));
  // A zero covariance (constant signal): eigenvalues 0, still an orthonormal basis.
  auto z = PcaBasis({1, 1}, {0, 0, 0, 0}, 2);
  ASSERT_TRUE(z.ok());
  EXPECT_THAT(z->eigenvalues, ElementsAre(0.0, 0.0));
  EXPECT_FALSE(PcaBasis({0, 0}, {NAN, 0, 0, 1}, 2).ok());
  EXPECT_FALSE(PcaBasis({0}, {1, 0, 0, 1}, 2).ok());
}

class CalibrateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = Model::Load(kModelPath);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(*m).release();
    auto text = ReadWholeFile(kCalibPath);
    ASSERT_TRUE(text.ok()) << text.status().ToString();
    tokens_ = new std::vector<int32_t>(model_->tokenizer().Encode(text->substr(0, kSliceBytes), true));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete tokens_;
    model_ = nullptr;
    tokens_ = nullptr;
  }
  static Model* model_;
  static std::vector<int32_t>* tokens_;
};
Model* CalibrateTest::model_ = nullptr;
std::vector<int32_t>* CalibrateTest::tokens_ = nullptr;

TEST_F(CalibrateTest, MatchesBruteForceMomentsOfCapturedKeysAndValues) {
  const int n_ctx = 128, n_batch = 48, n_chunks = 4;  // 48: batches that do not divide the chunk
  ASSERT_GE(tokens_->size(), static_cast<size_t>(n_ctx * n_chunks));
  ThreadPool pool(2);
  CalibrateOptions opt{n_ctx, n_batch, n_chunks, {}};
  int calls = 0;
  auto profile = Calibrate(*model_, *tokens_, opt, pool, [&](int c, int n) {
    EXPECT_EQ(c, ++calls);
    EXPECT_EQ(n, n_chunks);
  });
  ASSERT_TRUE(profile.ok()) << profile.status().ToString();
  EXPECT_EQ(calls, n_chunks);
  const DynaKvProfile& p = *profile;
  const ModelConfig& c = model_->config();
  const int D = c.n_head_kv * c.head_dim;
  EXPECT_EQ(p.n_layer, c.n_layer);
  EXPECT_EQ(p.n_head_kv, c.n_head_kv);
  EXPECT_EQ(p.head_dim, c.head_dim);
  EXPECT_EQ(p.model_fingerprint, model_->fingerprint());
  EXPECT_EQ(p.model_name, c.name);
  EXPECT_EQ(p.n_calib_tokens, n_ctx * n_chunks);
  EXPECT_EQ(p.levels, DefaultLevels(D));
  EXPECT_TRUE(CheckProfileMatchesModel(p, KvModelInfo{c.kv_shape(), model_->fingerprint(), kModelPath}, "p").ok());

  // Reference: the same chunks (BOS first) through a plain fp32 full cache, every row read back.
  const KvShape shape = c.kv_shape();
  FullKvCache cache(shape, n_ctx, KvDtype::kF32);
  ForwardState st(c, n_batch);
  std::vector<float> logits(c.n_vocab), row(D);
  std::vector<std::vector<double>> keys(c.n_layer), values(c.n_layer);  // [layer][token][D]
  for (int ch = 0; ch < n_chunks; ++ch) {
    std::vector<int32_t> chunk(tokens_->begin() + ch * n_ctx, tokens_->begin() + (ch + 1) * n_ctx);
    chunk[0] = model_->tokenizer().bos_id();
    cache.Clear();
    for (int b = 0; b < n_ctx; b += n_batch) {
      const int n = std::min(n_batch, n_ctx - b);
      ASSERT_TRUE(model_->Forward(chunk.data() + b, n, cache, st, logits.data(), false, pool).ok());
    }
    for (int l = 0; l < c.n_layer; ++l) {
      for (int t = 0; t < n_ctx; ++t) {
        cache.ReadK(l, t, row.data());
        keys[l].insert(keys[l].end(), row.begin(), row.end());
        cache.ReadV(l, t, row.data());
        values[l].insert(values[l].end(), row.begin(), row.end());
      }
    }
  }
  std::vector<double> mean, cov;
  for (int l = 0; l < c.n_layer; ++l) {
    BruteForceMoments(keys[l], D, &mean, &cov);
    ExpectBasisMatches(p.k[l], mean, cov, D, "layer " + std::to_string(l) + " K");
    BruteForceMoments(values[l], D, &mean, &cov);
    ExpectBasisMatches(p.v[l], mean, cov, D, "layer " + std::to_string(l) + " V");
  }

  // Same inputs, same bytes: the sign convention makes calibration reproducible.
  auto again = Calibrate(*model_, *tokens_, opt, pool);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(SerializeProfile(*again), SerializeProfile(p));
}

TEST_F(CalibrateTest, CustomLevelsAndErrors) {
  ThreadPool pool(1);
  CalibrateOptions opt{32, 32, 1, {4, 16}};
  auto p = Calibrate(*model_, *tokens_, opt, pool);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_THAT(p->levels, ElementsAre(4, 16, p->kv_dim()));
  EXPECT_EQ(p->n_calib_tokens, 32);

  const std::vector<int32_t> few(tokens_->begin(), tokens_->begin() + 31);
  auto short_text = Calibrate(*model_, few, CalibrateOptions{32, 32, -1, {}}, pool);
  ASSERT_FALSE(short_text.ok());
  EXPECT_EQ(short_text.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(short_text.status().message(), HasSubstr("31 tokens"));
  EXPECT_FALSE(Calibrate(*model_, *tokens_, CalibrateOptions{32, 32, 1, {0, 8}}, pool).ok());
  EXPECT_FALSE(Calibrate(*model_, *tokens_, CalibrateOptions{32, 32, 1, {8, 4}}, pool).ok());
  EXPECT_FALSE(Calibrate(*model_, *tokens_, CalibrateOptions{32, 32, 1, {1 << 20}}, pool).ok());
  EXPECT_FALSE(Calibrate(*model_, *tokens_, CalibrateOptions{1, 32, 1, {}}, pool).ok());
  EXPECT_FALSE(Calibrate(*model_, *tokens_, CalibrateOptions{32, 0, 1, {}}, pool).ok());
}

// Runs the CLI with output to a log; returns the exit code and fills *log.
int RunCli(const std::string& args, std::string* log) {
  const std::string log_path = W::TempPath("cli.log");
  const std::string cmd = std::string(DK_CLI_PATH) + " " + args + " > " + log_path + " 2>&1";
  const int raw = std::system(cmd.c_str());
  auto text = ReadWholeFile(log_path);
  *log = text.ok() ? *text : "";
  std::remove(log_path.c_str());
  return WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
}

TEST(CalibrateCli, CalibrateThenInfo) {
  auto text = ReadWholeFile(kCalibPath);
  ASSERT_TRUE(text.ok());
  const std::string slice = W::TempPath("slice.txt"), out = W::TempPath("cli.dkv");
  ASSERT_TRUE(W::WriteBytes(slice, std::vector<uint8_t>(text->begin(), text->begin() + 4000)));
  const std::string base = "calibrate -m " + kModelPath + " -f " + slice + " -t 2 -q ";
  std::string log;

  EXPECT_EQ(RunCli(base + "-c 64 -b 40 --chunks 2 --levels 8,32 -o " + out, &log), 0) << log;
  EXPECT_THAT(log, HasSubstr("wrote " + out));
  EXPECT_THAT(log, HasSubstr("explained variance"));
  auto p = LoadProfile(out);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_THAT(p->levels, ElementsAre(8, 32, p->kv_dim()));
  EXPECT_EQ(p->n_calib_tokens, 128);

  EXPECT_EQ(RunCli("info -m " + kModelPath + " --profile " + out, &log), 0) << log;
  EXPECT_THAT(log, HasSubstr("calibrated on 128 tokens"));
  EXPECT_THAT(log, HasSubstr("explained variance"));
  EXPECT_THAT(log, HasSubstr("fingerprint"));  // the existing info output is kept
  EXPECT_EQ(RunCli("info -m " + kOtherModelPath + " --profile " + out, &log), 1) << log;
  EXPECT_THAT(log, HasSubstr("was calibrated for model"));
  EXPECT_EQ(RunCli("info -m " + kModelPath + " --profile " + out + ".missing", &log), 1) << log;

  // Bad flags and values: one line naming the flag, usage, exit 2.
  for (const std::string& bad : {base + "-o " + out + " --bogus", base + "-o " + out + " -c 1",
                                 base + "-o " + out + " --chunks 0", base + "-o " + out + " --levels 8,x",
                                 base + "-o " + out + " --levels 8,,16", base + "-o " + out + " --levels 0,8",
                                 base + "-o " + out + " --levels 16,8", base + "-o " + out + " --levels 4096",
                                 base /* no -o */, std::string("calibrate -f ") + slice + " -o " + out}) {
    EXPECT_EQ(RunCli(bad, &log), 2) << bad << "\n" << log;
    EXPECT_THAT(log, HasSubstr("usage")) << bad;
  }
  EXPECT_EQ(RunCli("calibrate --help", &log), 0) << log;
  // Runtime failures: exit 1.
  EXPECT_EQ(RunCli("calibrate -m " + kModelPath + ".missing -f " + slice + " -o " + out, &log), 1) << log;
  EXPECT_EQ(RunCli(base + "-c 100000 -o " + out, &log), 1) << log;
  EXPECT_THAT(log, HasSubstr("at least one chunk"));
  std::remove(slice.c_str());
  std::remove(out.c_str());
}

}  // namespace
}  // namespace dk
