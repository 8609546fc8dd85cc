"""Acceptance of tokenrl's CUDA path on a GPU: the static KV cache with CUDA-graph decoding and the pass budget.

    python notebooks/gpu_check.py --out gpu-check.json      # on a GPU: Qwen2-1.5B's shape, random weights (~8 min)
    python notebooks/gpu_check.py --tiny                    # anywhere: a tiny shape, to try the script itself

Time and memory depend on shapes, not weights, so nothing is downloaded. It prints one line a figure and rewrites
the JSON report after each part, so a run cut short keeps what it measured:
1. tokens: the static sampler against `generate` (float32, bfloat16; |G| 8 and 50; greedy and T 0.3; an evaluation
   batch of left-padded prompts of three lengths; stop ids that end rows at different steps; 100 tokens): the share
   of identical tokens, the largest logit difference, every parting explained by a uniform within that difference
   of a CDF boundary, and whether the static path's own check against a plain forward passed;
2. captures: each CUDA graph once, its time, no fallback;
3. ms a decoding step (128 steps) at |G| 8, 16, 50: static, eager, transformers' `generate`, bf16 and float32;
4. the updates at the device's pass budget, bfloat16, 300-token completions: GRPO |G| 8 and T-SPMO |G| 50;
5. the command line with its defaults: each algorithm 3 steps then `--resume` for 2 more (graphs captured,
   evaluation included), and a tiny run moved from the GPU to the CPU with `--resume --device cpu`.
"""
import argparse, contextlib, dataclasses, gc, io, json, random, subprocess, sys, tempfile, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tokenrl  # noqa: E402

QWEN2 = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
TINY = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True)
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}  # Qwen2's ids


def build(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random Qwen2 of `shape` on the device, with LoRA where §4.1 puts it for multiplication."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    with device:
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(dtype).eval()
    model = tokenrl.add_lora(model, 8, 1 / 4, 8.0, ["q_proj", "v_proj"])
    with torch.no_grad():  # B = 0 would leave LoRA out of the forward; a moved adapter is the real case
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer reads what it did."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recorded(sample, *args, **kwargs) -> tuple[list, list]:
    """(completions, (logits, uniforms) that each draw saw) of one sampler call."""
    calls, real = [], tokenrl.draw
    def spy(logits, temperature, u):
        calls.append((logits.float().cpu(), None if u is None else u.cpu()))
        return real(logits, temperature, u)
    tokenrl.draw = spy
    try:
        return sample(*args, **kwargs), calls
    finally:
        tokenrl.draw = real


def compare(eager: tuple, static: tuple, temperature: float) -> dict:
    """Tokens equal, the largest logit difference while rows agree, and whether each parting is explained: its
    uniform within the two paths' difference of a CDF boundary (greedy: its two best logits within twice it)."""
    (rows_e, calls_e), (rows_s, calls_s) = eager, static
    same = total = parted = unexplained = 0
    gap_max = 0.0
    for r, (a, b) in enumerate(zip(rows_e, rows_s)):
        for t in range(min(len(a), len(b))):
            live = sum(len(q) > t for q in rows_e[:r])  # generate's batch holds only the rows still sampling
            mine = r if len(calls_s[t][0]) == len(rows_s) else live  # the static batch keeps all (unless it fell back)
            le, ls = calls_e[t][0][live].double(), calls_s[t][0][mine].double()
            gap = float((le - ls).abs().max())
            gap_max, total = max(gap_max, gap), total + 1
            if a[t] == b[t]:
                same += 1
                continue
            parted += 1
            if temperature == 0:
                best = le.topk(2).values
                unexplained += float(best[0] - best[1]) > 2 * gap
            else:
                ce, cs = (torch.softmax(x / temperature, -1).cumsum(-1) for x in (le, ls))
                u = float(calls_e[t][1][live])
                unexplained += float((ce - u).abs().min()) > float((ce - cs).abs().max()) + 1e-12
            break
    return {"same": same / max(total, 1), "max_dlogit": gap_max, "parted": parted, "unexplained": unexplained}


def stops_for(model, prompts: list[list[int]], n: int, temperature: float, copies: int) -> list[int]:
    """Stop ids that end rows at different steps: tokens the first and last rows draw at n/4 and n/2 under the
    seed the comparison uses (random weights rarely repeat a token, so none is frequent enough)."""
    torch.manual_seed(7)
    free = tokenrl.generate(model, prompts, n, temperature, [-5], 0, copies=copies)
    return sorted({free[0][n // 4], free[-1][n // 2]})


def part_tokens(report: dict, shape: dict, device: torch.device, n: int, graphs: bool) -> None:
    rng, n = random.Random(0), min(n, 100)  # every draw's logits are kept: (rows, 151,936) floats a step
    for dtype in (torch.float32, torch.bfloat16):
        model = build(shape, dtype, device)
        static = tokenrl.static_sampler(graphs=graphs)
        prompts = [[rng.randrange(151643) for _ in range(length)] for length in (17, 45, 128)]
        cases = [(f"G{g}/T{t}", [prompts[1]], g, t) for g in (8, 50) for t in (0.0, 0.3)]
        cases += [(f"eval16/T{t}", [prompts[i % 3] for i in range(16)], 1, t) for t in (0.0, 0.3)]
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            for name, batch, copies, t in cases:
                stops = stops_for(model, batch, n, t, copies)
                torch.manual_seed(7)
                eager = recorded(tokenrl.generate, model, batch, n, t, stops, 0, copies=copies)
                torch.manual_seed(7)
                got = compare(eager, recorded(static, model, batch, n, t, stops, 0, copies=copies), t)
                got["lengths"] = [min(map(len, eager[0])), max(map(len, eager[0]))]  # rows ended at different steps
                report[f"tokens/{str(dtype)[6:]}/{name}"] = got
                print(f"tokens {str(dtype)[6:]:8s} {name:12s} same {got['same']:.4f}  max |dlogit| "
                      f"{got['max_dlogit']:.2e}  parted {got['parted']} (unexplained {got['unexplained']})  "
                      f"lengths {got['lengths']}")
        report[f"tokens/{str(dtype)[6:]}/fell_back"] = "disagrees" in errors.getvalue()
        del model, static
        gc.collect()


def part_speed(report: dict, shape: dict, device: torch.device, n: int, graphs: bool) -> None:
    n = min(n, 128)  # ms a step: 128 steps are enough, and generate at |G| 50 is slow
    for dtype in (torch.bfloat16, torch.float32):
        model, prompt = build(shape, dtype, device), list(range(1000, 1128))
        static = tokenrl.static_sampler(graphs=graphs)
        never = [shape["vocab_size"]]  # no token ends a row: every step is timed at full width
        runs = {"static": lambda g: static(model, [prompt], n, 0.3, never, 0, copies=g),
                "eager": lambda g: tokenrl.generate(model, [prompt], n, 0.3, never, 0, copies=g),
                "generate": lambda g: model.generate(torch.tensor([prompt], device=device), do_sample=True,
                                                     temperature=0.3, top_k=0, top_p=1.0, max_new_tokens=n,
                                                     min_new_tokens=n, num_return_sequences=g, pad_token_id=0)}
        for g in (8, 16, 50):
            for name, run in runs.items():
                run(g)  # warm: allocator, capture
                sync(device)
                start = time.perf_counter()
                run(g)
                sync(device)
                report[f"ms_step/{str(dtype)[6:]}/{name}/{g}"] = ms = 1000 * (time.perf_counter() - start) / n
                print(f"ms a decoding step {str(dtype)[6:]:8s} {name:8s} |G| {g:2d}: {ms:.2f}")
        del model, static
        gc.collect()


def part_updates(report: dict, shape: dict, device: torch.device, n: int) -> None:
    model, rng = build(shape, torch.bfloat16, device), random.Random(0)
    cfg = tokenrl.resolve_config(tokenrl.Config(algo="grpo", task="mult", device=str(device), max_new_tokens=n))
    cfg, _ = tokenrl.device_choices(cfg, model)
    tokens = lambda k: [rng.randrange(151643) for _ in range(k)]
    prompt = tokens(45)
    def branching(size: int, distinct: int) -> list[list[int]]:  # completions that part at uniform depths
        rows = [tokens(n)]
        for _ in range(distinct - 1):
            parent, cut = rng.choice(rows), rng.randrange(n)
            rows.append(parent[:cut] + tokens(n - cut))
        return [rows[i % distinct] for i in range(size)]
    groups = {"grpo": [tokens(n) for _ in range(8)], "tspmo": branching(50, 20)}
    for algo, group in groups.items():
        run = dataclasses.replace(cfg, algo=algo)
        rewards = [float(i % 2) for i in range(len(group))]  # rows i and i + 20 (one completion) share a reward
        for _ in range(2):  # the first call warms the shapes up; the second is timed
            model.zero_grad(set_to_none=True)
            sync(device)
            tokenrl.peak_memory_mb(device, reset=True)
            start = time.perf_counter()
            stats = tokenrl.group_update(model, prompt, group, rewards, run, generator=torch.Generator(),
                                         reference=tokenrl.reference_from_first_adapted_layer)  # as train()
            sync(device)
        report[f"update_s/{algo}"] = seconds = time.perf_counter() - start
        report[f"update_mb/{algo}"] = peak = tokenrl.peak_memory_mb(device)
        print(f"update {algo:6s} |G| {len(group)} x {n} tokens, pass budget {cfg.pass_tokens}: {seconds:.3f} s, "
              f"peak {peak:.0f} MB, loss tokens {stats['loss_tokens']}")
    del model
    gc.collect()


def save_model(folder: Path, shape: dict, device: torch.device) -> None:
    """A random Qwen2 of `shape` and a ChatML tokenizer at Qwen2's ids, as a model folder for --model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    chars = list(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'$%()+-*/=\n")
    vocab = {token: i for i, token in enumerate(chars)}
    vocab.update({f"<w{i}>": i for i in range(len(chars), shape["vocab_size"]) if i not in SPECIALS.values()})
    vocab.update(SPECIALS)
    core = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    with device:  # a GPU draws 1.5B random weights in a second; a CPU takes a minute
        model = Qwen2ForCausalLM(Qwen2Config(**shape, bos_token_id=151643, eos_token_id=151643))
    model.generation_config.eos_token_id = 151643  # as Qwen2-1.5B base
    with tokenrl.quiet():
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)


def cli(*flags) -> tuple[float, str]:
    """(seconds, stderr) of one tokenrl.py command; a failure stops the check with its last lines."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "tokenrl.py"), *map(str, flags)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"tokenrl.py {' '.join(map(str, flags))} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stderr + done.stdout


def part_cli(report: dict, shape: dict, device: torch.device, n: int, work: Path) -> None:
    folder, tiny = work / "model", work / "tiny"
    save_model(folder, shape, device)
    save_model(tiny, TINY, device)
    small = ["--task", "mult", "--max-new-tokens", n, "--test-size", 16, "--eval-subset", 16, "--eval-every", 3]
    for algo in ("grpo", "sgrpo", "tspmo"):
        out = work / algo
        first, text = cli("--algo", algo, "--model", folder, "--steps", 3, "--out", out, *small)
        again, more = cli("--resume", "--out", out, "--steps", 5)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        graphs = (text + more).count("CUDA graph for")
        fallback = sum(s in text + more for s in ("no CUDA graph", "disagrees", "without a static KV cache"))
        sample = sum(r["time/sample"] for r in steps) / len(steps)
        update = sum(r["time/update"] for r in steps) / len(steps)
        row_min = tokenrl.PAPER_DEFAULTS["mult"]["steps"][algo] * (sample + update) / 60  # replays included
        report[f"cli/{algo}"] = {"steps": [r["step"] for r in steps], "first_s": first, "resume_s": again,
                                 "sample_s": sample, "update_s": update, "graph_lines": graphs, "fallbacks": fallback,
                                 "paper_row_min_training": row_min}
        print(f"cli {algo:6s}: steps {[r['step'] for r in steps]}, {first:.0f} s + resume {again:.0f} s, a step "
              f"{sample:.1f} s sampling + {update:.2f} s update, {graphs} graph lines, {fallback} fallbacks; "
              f"a paper row's training ~{row_min:.0f} min")
    out = work / "moved"
    cli("--algo", "sgrpo", "--model", tiny, "--steps", 2, "--out", out, "--device", device.type, *small)
    cli("--resume", "--out", out, "--steps", 3, "--device", "cpu")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    report["cli/moved_to_cpu"] = steps
    print(f"tiny run on {device.type}, resumed on cpu: steps {steps}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and 16 tokens: try the script anywhere")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report")
    parser.add_argument("--parts", default="tokens,speed,updates,cli", help="which parts, comma-separated")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, n = (TINY, 16) if args.tiny else (QWEN2, 300)
    graphs, report = device.type == "cuda", {"device": torch.cuda.get_device_name() if device.type == "cuda" else
                                            "cpu", "torch": torch.__version__, "tiny": args.tiny}
    captures, real = [], tokenrl.cuda_graph
    def counted(step, what):  # each capture: its shape, seconds, and whether it fell back to plain steps
        start = time.perf_counter()
        made = real(step, what)
        captures.append({"what": what, "s": time.perf_counter() - start, "fell_back": made is step})
        return made
    tokenrl.cuda_graph = counted
    parts = {"tokens": lambda: part_tokens(report, shape, device, n, graphs),
             "speed": lambda: part_speed(report, shape, device, n, graphs),
             "updates": lambda: part_updates(report, shape, device, n),
             "cli": lambda: part_cli(report, shape, device, n, Path(tempfile.mkdtemp(prefix="tokenrl-gpu-check-")))}
    for name in args.parts.split(","):
        start = time.perf_counter()
        parts[name]()
        report[f"wall_s/{name}"] = time.perf_counter() - start
        report["captures"] = captures
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"-- {name}: {report[f'wall_s/{name}']:.0f} s; {len(captures)} captures so far, "
              f"{sum(c['fell_back'] for c in captures)} fell back")


if __name__ == "__main__":
    main()
