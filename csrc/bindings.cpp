// Schemas of every op in the `kvreviver` torch namespace. CPU and CUDA
// implementations register against these in their own translation units.
// Reference semantics: kvreviver_vllm/ops/reference.py.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(kvreviver, m) {
  // Store key/value [T, Hkv, D] and positions at their slots; slot < 0 = padding.
  m.def(
      "write_kv(Tensor(a!) kv_cache, Tensor key, Tensor value, "
      "Tensor slot_mapping, Tensor positions) -> ()");
  // Causal attention of each request's query rows over its first seq_lens
  // slots; the last score_window query rows of each request add the attention
  // each slot received to its score (0: none).
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor(b!) kv_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, "
      "float scale, int score_window) -> ()");
  // paged_attention over [vague tokens revived from the request's quantized
  // store (its first exact_start slots) | exact slots [exact_start, seq_len)],
  // one softmax; scores of records and slots grow as in paged_attention.
  m.def(
      "paged_attention_quantized(Tensor(a!) out, Tensor query, Tensor(b!) kv_cache, "
      "Tensor block_table, Tensor exact_start, Tensor seq_lens, Tensor vague_tokens, "
      "Tensor query_start_loc, float scale, int score_window, int bits, int group, "
      "int value_bits=0) -> ()");
  // Compaction of one request (block_row [width]), per KV head: move its slots
  // kept_slots [Hkv, keep] (ascending) to slots [0, keep), scores reset.
  m.def("compact_slots(Tensor(a!) kv_cache, Tensor block_row, Tensor kept_slots) -> ()");
  // Compaction into the quantized store, per KV head: keep exact slots
  // kept_exact [Hkv, K] (ascending indices into [exact_start, seq_len)), turn the
  // others into records, keep the keep_vague best of old + new records (score
  // pooled: max(s_i, pool_decay * max over records [i - pool_after, i + pool_before]),
  // ties to the older) in position order at slots [0, P), the kept exact slots
  // right after; every score reset. No defaults here: the pooling is the config's
  // (kvreviver_vllm), and a schema cannot put required arguments after a
  // defaulted one, so value_bits (0: bits) is passed too.
  m.def(
      "compact_quantized(Tensor(a!) kv_cache, Tensor block_row, int exact_start, int seq_len, "
      "int num_vague, Tensor kept_exact, int keep_vague, int bits, int group, "
      "int value_bits, int pool_before, int pool_after, float pool_decay) -> ()");
  // Records uint8 [N, record_bytes] of tokens keys/values [N, D] (quantized
  // per group of channels, keys at `bits` bits, values at `value_bits`, 0: the
  // same), with their positions and scores. Every quantized-store op takes the
  // same (bits, group, value_bits).
  m.def(
      "quantize_records(Tensor keys, Tensor values, Tensor positions, Tensor scores, "
      "int bits, int group, int value_bits=0) -> Tensor");
  // Keys and values float32 [N, D] of records.
  m.def(
      "dequantize_records(Tensor records, int head_size, int bits, int group, int value_bits=0) "
      "-> (Tensor, Tensor)");
  // Adds keys/values [N, D], signed, to their buckets of the float32
  // [rows, buckets, D] sums; hashes from positions and coefficients [rows, 4].
  m.def(
      "count_sketch_add(Tensor(a!) bucket_keys, Tensor(b!) bucket_values, Tensor keys, "
      "Tensor values, Tensor positions, Tensor coefficients) -> ()");
  // Each position's estimate: mean over rows of sign * its bucket, [N, D].
  m.def("count_sketch_estimate(Tensor buckets, Tensor positions, Tensor coefficients) -> Tensor");
  // query [Q, D] times every position's key estimate, [Q, N], in bucket space.
  m.def(
      "count_sketch_logits(Tensor query, Tensor bucket_keys, Tensor positions, "
      "Tensor coefficients) -> Tensor");
}

// `import kvreviver_vllm._C` loads this library, which runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
