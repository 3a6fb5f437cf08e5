// kiln-llama-logits: llama.cpp's logits and greedy tokens for a GGUF model and a prompt given as
// token ids, the peer reference of kiln.llm (tests/python/test_llm.py). kiln's own program,
// compiled against llama.cpp's public C API (include/llama.h) by dev/llm/peer/CMakeLists.txt.
//
//   kiln-llama-logits MODEL.gguf --prompt 1,2,3 --steps 64 --out PREFIX
//                     [--threads N] [--cache f32|f16|bf16] [--gpu-layers N]
//
// Decodes the prompt in one batch (logits of every position), then `steps - 1` greedy steps of
// one token (argmax, lowest id on ties), so `steps` tokens are generated. Writes
//   PREFIX.logits  f32 little-endian [prompt + steps - 1, vocab]: row t is the logits after
//                  token t of prompt + generated[0 : steps - 1]
//   PREFIX.tokens  the generated ids, one a line
// and prints one JSON line with the shapes and llama.cpp's system info on stdout.
#include <llama.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "kiln-llama-logits: %s\n", message.c_str());
  std::exit(1);
}

std::vector<llama_token> parse_ids(const std::string& text) {
  std::vector<llama_token> ids;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = text.find(',', start);
    const std::string item =
        text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    ids.push_back(static_cast<llama_token>(std::stol(item)));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return ids;
}

ggml_type cache_type(const std::string& name) {
  if (name == "f32") return GGML_TYPE_F32;
  if (name == "f16") return GGML_TYPE_F16;
  if (name == "bf16") return GGML_TYPE_BF16;
  fail("--cache: expected f32, f16 or bf16, got '" + name + "'");
}

void quiet_log(ggml_log_level level, const char* text, void*) {
  if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
}

// Appends the logits of batch row `row` to `out` and returns their argmax (lowest id on ties).
llama_token take_logits(llama_context* context, int row, int vocab, std::vector<float>& out) {
  const float* logits = llama_get_logits_ith(context, row);
  if (logits == nullptr) fail("no logits for batch row " + std::to_string(row));
  out.insert(out.end(), logits, logits + vocab);
  int best = 0;
  for (int v = 1; v < vocab; ++v) {
    if (logits[v] > logits[best]) best = v;
  }
  return static_cast<llama_token>(best);
}

void decode(llama_context* context, const std::vector<llama_token>& tokens, int first_position) {
  llama_batch batch = llama_batch_init(static_cast<int>(tokens.size()), 0, 1);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    batch.token[i] = tokens[i];
    batch.pos[i] = first_position + static_cast<int>(i);
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = 0;
    batch.logits[i] = 1;
  }
  batch.n_tokens = static_cast<int>(tokens.size());
  const int status = llama_decode(context, batch);
  llama_batch_free(batch);
  if (status != 0) fail("llama_decode returned " + std::to_string(status));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) fail("usage: kiln-llama-logits MODEL.gguf --prompt IDS --steps N --out PREFIX");
  const std::string model_path = argv[1];
  std::string prompt_text, out_prefix, cache = "f32";
  int steps = 64, threads = 2, gpu_layers = 0;
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) fail(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--prompt")
      prompt_text = value;
    else if (flag == "--steps")
      steps = std::stoi(value);
    else if (flag == "--out")
      out_prefix = value;
    else if (flag == "--threads")
      threads = std::stoi(value);
    else if (flag == "--cache")
      cache = value;
    else if (flag == "--gpu-layers")
      gpu_layers = std::stoi(value);
    else
      fail("unknown flag " + flag);
  }
  const std::vector<llama_token> prompt = parse_ids(prompt_text);
  if (prompt.empty() || steps < 1 || out_prefix.empty())
    fail("--prompt, --steps >= 1 and --out are required");

  llama_log_set(quiet_log, nullptr);
  llama_backend_init();
  llama_model_params model_params = llama_model_default_params();
  model_params.n_gpu_layers = gpu_layers;
  llama_model* model = llama_model_load_from_file(model_path.c_str(), model_params);
  if (model == nullptr) fail("llama.cpp could not load " + model_path);
  const int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  for (const llama_token id : prompt) {
    if (id < 0 || id >= vocab) fail("prompt id " + std::to_string(id) + " outside the vocabulary");
  }

  const int rows = static_cast<int>(prompt.size()) + steps - 1;
  llama_context_params context_params = llama_context_default_params();
  context_params.n_ctx = static_cast<uint32_t>(rows + 1);
  context_params.n_batch = static_cast<uint32_t>(prompt.size());
  context_params.n_ubatch = static_cast<uint32_t>(prompt.size());
  context_params.n_threads = threads;
  context_params.n_threads_batch = threads;
  context_params.type_k = cache_type(cache);
  context_params.type_v = cache_type(cache);
  context_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
  llama_context* context = llama_init_from_model(model, context_params);
  if (context == nullptr) fail("llama.cpp could not create a context");

  std::vector<float> logits;
  logits.reserve(static_cast<std::size_t>(rows) * vocab);
  std::vector<llama_token> generated;
  decode(context, prompt, 0);
  for (int t = 0; t < static_cast<int>(prompt.size()); ++t) {
    const llama_token best = take_logits(context, t, vocab, logits);
    if (t + 1 == static_cast<int>(prompt.size())) generated.push_back(best);
  }
  for (int step = 1; step < steps; ++step) {
    decode(context, {generated.back()}, static_cast<int>(prompt.size()) + step - 1);
    generated.push_back(take_logits(context, 0, vocab, logits));
  }

  std::ofstream(out_prefix + ".logits", std::ios::binary)
      .write(reinterpret_cast<const char*>(logits.data()),
             static_cast<std::streamsize>(logits.size() * sizeof(float)));
  std::ofstream tokens_file(out_prefix + ".tokens");
  for (const llama_token id : generated) tokens_file << id << '\n';
  std::printf("{\"rows\": %d, \"vocab\": %d, \"cache\": \"%s\", \"system\": \"%s\"}\n", rows, vocab,
              cache.c_str(), llama_print_system_info());

  llama_free(context);
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
