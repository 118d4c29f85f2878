// dynakv export-profile: a profile's bases, means, levels and router as safetensors plus a JSON
// config, for serving engines outside dynakv (docs/profile_format.md, "Export").
#include <cstdio>

#include "kv/profile.h"
#include "kv/profile_export.h"
#include "tools/common.h"

namespace dk::cli {

int CmdExportProfile(int argc, char** argv) {
  std::string profile_path, out_dir;
  bool help = false;
  ArgParser p("export-profile", "write a profile as safetensors + JSON, for PyTorch serving engines");
  p.AddPositional(&profile_path, "PROFILE.dkv", "the profile to export (from calibrate or train-router)");
  p.AddString({"-o", "--output"}, &out_dir, "DIR", "folder to write dynakv.safetensors and dynakv_config.json into");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("export-profile", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (profile_path.empty()) return UsageError("export-profile", p, InvalidArgument("PROFILE.dkv: a profile is required"));
  if (out_dir.empty()) return UsageError("export-profile", p, InvalidArgument("-o: an output folder is required"));
  if (Status s = CheckOutputFolder(out_dir, "-o", "dynakv.safetensors"); !s.ok())
    return UsageError("export-profile", p, s);
  auto profile = LoadProfile(profile_path);
  if (!profile.ok()) return Fail("export-profile", profile.status());
  if (Status s = ExportProfile(*profile, out_dir); !s.ok()) return Fail("export-profile", s);
  std::printf("wrote %s/dynakv.safetensors and %s/dynakv_config.json (%d layers, D = %d%s)\n", out_dir.c_str(),
              out_dir.c_str(), profile->n_layer, profile->kv_dim(), profile->router ? ", with the router" : "");
  return kExitOk;
}

}  // namespace dk::cli
