// Exports a DynaKV profile in open formats, so a PyTorch serving engine (vLLM, Hugging Face) can
// load DynaKV's projections: the bases, means, eigenvalues, levels, and the router with its budget
// table as safetensors, and a JSON config that says what they are. Names, shapes and meaning:
// docs/profile_format.md ("Export").
#pragma once

#include <string>

#include "core/status.h"
#include "kv/profile.h"

namespace dk {

// Writes <dir>/dynakv.safetensors and <dir>/dynakv_config.json (the folder must exist), each
// atomically.
Status ExportProfile(const DynaKvProfile& profile, const std::string& dir);

}  // namespace dk
