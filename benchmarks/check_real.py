"""By hand (python benchmarks/check_real.py RUN_DIR): LoRA run on the real default model -> GGUF f16/f32/q8_0 -> llama.cpp greedy vs transformers greedy."""
import json, sys, time, torch
import llama_cpp
from lmtune.checkpoint import load_merged
from lmtune.export import export
torch.set_num_threads(1)
run = sys.argv[1]
merged, tok = load_merged(run)
prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
           for q in ["Who are you?", "What is the capital of France?", "What is 2 + 2?"]]
N = 24
res = {}
for quant in ["f32", "f16", "q8_0"]:
    path = f"quill-{quant}.gguf"
    t = time.process_time(); export(run, path, quant=quant); t = time.process_time() - t
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False, type_k=0, type_v=0)
    agree = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        assert llm.tokenize(p.encode(), add_bos=False, special=True) == ids
        with torch.no_grad():
            want = merged.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
        got = []
        for x in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(x)
            if len(got) == N: break
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), N)
        agree.append(same)
        print(quant, repr(tok.decode(want)), "| cpp:", repr(tok.decode(got)), "| first", same, "of", N, "agree", flush=True)
    import os
    res[quant] = {"identical_prefix_tokens": agree, "of": N, "file_MB": round(os.path.getsize(path) / 1e6, 1), "export_cpu_s": round(t, 1)}
    os.unlink(path)
print(json.dumps(res, indent=1))
