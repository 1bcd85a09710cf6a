// Greedy continuation of fixed token ids by Transformers.js, offline, from a local model folder.
// usage: node greedy.mjs MODEL_DIR DTYPE N_NEW ID,ID,...   -> prints {"tokens": [...]} (new ids)
import path from "node:path";
import { env, AutoModelForCausalLM, Tensor } from "@huggingface/transformers";

const [dir, dtype, nNew, idsText] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;
const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(dir)), {
  dtype,
  device: "cpu",
});
const ids = idsText.split(",").map((x) => BigInt(x));
const input_ids = new Tensor("int64", BigInt64Array.from(ids), [1, ids.length]);
const attention_mask = new Tensor("int64", BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
const out = await model.generate({
  input_ids,
  attention_mask,
  max_new_tokens: Number(nNew),
  do_sample: false,
});
const all = Array.from(out.data, (x) => Number(x));
console.log(JSON.stringify({ tokens: all.slice(ids.length) }));
