"""Train tokenrl's S-GRPO (and GRPO) or T-SPMO with replay on TRL's GRPOTrainer, on one process or many.

    python notebooks/trl_train.py --algo tspmo --task mult --out runs/trl-tspmo
    torchrun --nproc_per_node 4 notebooks/trl_train.py --algo sgrpo --task svamp
    accelerate launch --num_processes 4 notebooks/trl_train.py --algo tspmo --task mult --use-vllm

Every flag of tokenrl.py means what it means there (the same parser, defaults and checks: `resolve_config`); the
flags that are TRL's alone keep TRL's names (`--use-vllm`, `--per-device-train-batch-size`, ...; `--help` lists
them). The pieces of the paper come from tokenrl.py's Part 1: Eq. 2 (`group_advantages`), Eq. 6
(`sgrpo_token_mask`), the trie of Eq. 7-9 (`tspmo_advantages`), Eq. 10 as tokenrl's packed trie pass (`pack_trie`,
`trie_pass`, `tspmo_objective`, `lora_l2`), and replay (`replay_updates`, §3.3). Each process holds whole groups.
Written for TRL 1.16.0: the TRL methods overridden here are checked against the TRL installed, at start-up.
"""
import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tokenrl  # noqa: E402

TRL_VERSION = "1.16.0"
# what each TRL method overridden below looked like in TRL_VERSION: a change means the overrides may be wrong
OVERRIDDEN = {"_generate_and_score_completions": "(self, inputs: list[dict[str, torch.Tensor | typing.Any]]) -> "
                                                 "dict[str, torch.Tensor | typing.Any]",
              "_calculate_rewards": "(self, inputs, prompts, completions, completion_ids_list)",
              "_compute_loss": "(self, model, inputs)"}
TRL_FLAGS = {  # TRL's own settings, by TRL's names: (type, default, help)
    "per_device_train_batch_size": (int, None, "rows a process holds a step; default --group-size (one group)"),
    "steps_per_generation": (int, 1, "micro-batches that one generation is split into (T-SPMO: 1)"),
    "gradient_accumulation_steps": (int, 1, "micro-batches a step"),
    "gradient_checkpointing": (bool, False, "recompute activations in backward (less memory, twice the forward)"),
    "use_vllm": (bool, False, "generate with vLLM in colocate mode (pip install vllm)"),
    "vllm_gpu_memory_utilization": (float, 0.3, "with --use-vllm: the share of GPU memory vLLM takes"),
    "save_steps": (int, 25, "save a TRL checkpoint (with the replay buffer) every N steps"),
    "resume_from_checkpoint": (str, "", "a checkpoint-N folder of --out to continue from ('last': the newest)"),
}


class TrlError(ValueError):
    """A setting TRL or the paper cannot serve: one line, before any work."""


def check_trl() -> None:
    """Each overridden TRL method still has the signature it was written for."""
    import trl
    from trl import GRPOTrainer

    for name, written_for in OVERRIDDEN.items():
        now = str(inspect.signature(getattr(GRPOTrainer, name)))
        if now != written_for:
            raise TrlError(f"TRL {trl.__version__}'s GRPOTrainer.{name}{now} is not the one this script was written "
                           f"for (TRL {TRL_VERSION}): pip install trl=={TRL_VERSION}")


def whole_groups(per_device: int, group: int, steps_per_generation: int, algo: str) -> None:
    """Refuse a setting that would split a group (Eq. 2 and the trie of Eq. 7-9 need a group together)."""
    if per_device % group:
        raise TrlError(f"--per-device-train-batch-size {per_device} would split groups of --group-size {group} "
                       "across processes or micro-batches; use a multiple of the group size")
    if algo == "tspmo" and (per_device != group or steps_per_generation != 1):
        raise TrlError("T-SPMO's packed trie pass takes one whole group a micro-batch: use "
                       f"--per-device-train-batch-size {group} (the group size) and --steps-per-generation 1")


# --- the subclasses -------------------------------------------------------------------------------------------------
def trainers():
    """(SGRPOTrainer, TSPMOTrainer), built when TRL is imported."""
    from trl import GRPOTrainer

    class PaperBase(GRPOTrainer):
        """What both share: pi_ref is the base model (§3.2), the step's rewards are kept, and whole groups."""

        def __init__(self, *args, cfg: tokenrl.Config, **kwargs):
            super().__init__(*args, **kwargs)
            self.cfg = cfg
            model = self.accelerator.unwrap_model(self.model)
            if "ref" in getattr(model, "peft_config", {}):  # TRL's pi_ref for a PeftModel: a copy of its adapter
                model.delete_adapter("ref")

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            # (every process's completions, reward functions): TRL keeps only the advantages it derives from it
            self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self._rewards_per_func

        def group_rewards(self, rows: int) -> torch.Tensor:
            """This process's rewards as (groups, |G|), the reward functions summed with TRL's weights."""
            rewards = (self._rewards_per_func * self.reward_weights.to(self._rewards_per_func.device)).nansum(dim=1)
            start = self.accelerator.process_index * rows
            return rewards[start:start + rows].view(-1, self.num_generations).cpu()

        def loss_tokens(self, count: int) -> None:
            """tokens/loss of the step (Table 3), summed over every process's groups."""
            total = self.accelerator.gather(torch.tensor([float(count)], device=self.accelerator.device)).sum()
            self._metrics["train"]["tokens/loss"].append(float(total))

    class SGRPOTrainer(PaperBase):
        """S-GRPO (Eq. 5-6) on TRL's own GRPO loss: Eq. 2's advantages, and T_i as TRL's tool mask. GRPO (§3.4) is
        S-GRPO with every token in T_i."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_generator = torch.Generator().manual_seed(self.cfg.seed + self.accelerator.process_index)

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            mask = output["completion_mask"]  # (B, T), by position: 1 up to and including the stop token
            rewards = self.group_rewards(mask.size(0))  # Eq. 2 as tokenrl computes it (TRL: std + 1e-4)
            output["advantages"] = torch.cat([tokenrl.group_advantages(r) for r in rewards]).to(mask.device)
            token_sets = torch.zeros_like(mask)  # Eq. 6; TRL's loss mask is completion_mask * tool_mask
            for row, length in enumerate(mask.sum(dim=1).tolist()):
                token_sets[row, :length] = (torch.ones(length) if self.cfg.algo == "grpo" else tokenrl.sgrpo_token_mask(
                    length, self.cfg.alpha, self.cfg.k, self.cfg.p, generator=self.token_generator))
            output["tool_mask"] = token_sets * output.get("tool_mask", 1)
            self.loss_tokens(int(output["tool_mask"].sum()))
            return output

    class TSPMOTrainer(PaperBase):
        """T-SPMO (Eq. 7-10): the trie's advantages, and Eq. 10 by tokenrl's packed trie pass, one forward a group
        through the (DDP-wrapped) model, so that the gradients sync as TRL's own loss would; replay after each step."""

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            ids, mask = output["completion_ids"], output["completion_mask"]
            rewards = self.group_rewards(ids.size(0))
            completions = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
            prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
            self.groups = []  # this process's groups, for the loss and for replay
            for g, group in enumerate(rewards):
                rows = range(g * self.num_generations, (g + 1) * self.num_generations)
                prompt = prompt_ids[rows[0]][prompt_mask[rows[0]].bool()].tolist()
                adv, unique_pairs = tokenrl.tspmo_advantages([completions[r] for r in rows], group.tolist())
                self.groups.append(dict(prompt=prompt, completions=[completions[r] for r in rows],
                                        rewards=group.tolist(), adv=adv, unique_pairs=unique_pairs,
                                        answer=inputs[rows[0]]["answer"], question=inputs[rows[0]]["question"]))
            self.loss_tokens(sum(int((g["unique_pairs"] & (g["adv"] != 0)).sum()) for g in self.groups))
            output["advantages"] = torch.zeros(ids.size(0), device=ids.device)  # TRL's logging reads it
            output["group"] = torch.arange(ids.size(0), device=ids.device) // self.num_generations
            return output

        def _compute_loss(self, model, inputs):
            group = self.groups[int(inputs["group"][0])]  # one whole group a micro-batch (whole_groups checks)
            return tspmo_loss(model, self.accelerator.unwrap_model(model), group, lam=self.cfg.lam,
                              loss_temperature=self.cfg.temperature if self.cfg.logp_temperature else 1.0,
                              use_logprob=self.cfg.tspmo_logprob)

    return SGRPOTrainer, TSPMOTrainer


class Through:
    """tokenrl's functions read the model (config, parameters, head) from the module and call it through the DDP
    wrapper, so that the forward takes part in DDP's gradient sync."""

    def __init__(self, wrapped, module):
        self.wrapped, self.module = wrapped, module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)


def tspmo_loss(wrapped, module, group: dict, lam: float, loss_temperature: float, use_logprob: bool) -> torch.Tensor:
    """-J_TSPMO of Eq. 10 for one group, tokenrl's tspmo_update as one packed pass that returns its loss: the prompt
    once and the trie nodes on the paths to pairs with A != 0 once. Every process runs exactly one forward (a group
    with no such pair forwards its prompt with weight 0), as DDP needs."""
    completions, adv, unique_pairs = group["completions"], group["adv"], group["unique_pairs"]
    model = Through(wrapped, module)
    passes = tokenrl.pack_trie(completions, unique_pairs & (adv != 0), pass_tokens=sys.maxsize)
    if passes:
        nodes, parents, rows, pairs = passes[0]
        logp = tokenrl.trie_pass(model, group["prompt"], nodes, parents=parents, rows=rows,
                                 targets=[completions[i][t] for i, t in pairs], temperature=loss_temperature)
        advantages = torch.tensor([float(adv[i, t]) for i, t in pairs], device=logp.device)
        objective = tokenrl.tspmo_objective(logp, advantages, int(unique_pairs.sum()), use_logprob)
    else:
        prompt = torch.tensor([group["prompt"]], device=next(module.parameters()).device)
        objective = 0.0 * model(input_ids=prompt, logits_to_keep=1).logits.sum()
    return lam * tokenrl.lora_l2(module) - objective


# --- replay (§3.3): tokenrl's replay_updates, the processes' gradients averaged at each of its AdamW steps --------
class AveragedSteps:
    """An optimizer whose step() first averages the trainable gradients over the processes, as DDP does in backward:
    tokenrl's replay_updates computes each replay's gradient locally (any number of passes) and steps it."""

    def __init__(self, optimizer, params: list[torch.Tensor], world: int):
        self.optimizer, self.params, self.world, self.steps = optimizer, params, world, 0

    def step(self) -> None:
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
        self.optimizer.step()
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def replay_callback(trainer, cfg: tokenrl.Config, tokenizer, out: Path):
    """A TrainerCallback that, after each T-SPMO step, runs tokenrl's replay_updates on this process's own past
    completions, and saves and restores the buffer with TRL's checkpoints."""
    from transformers import TrainerCallback

    module = trainer.accelerator.unwrap_model(trainer.model)
    stop_ids = tokenrl.stop_token_ids(tokenizer, module, chat=tokenrl.uses_chat_template(cfg.task, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    buffer = {"problem": [], "completion": [], "reward": []}
    problems: list[tokenrl.Problem] = []

    class Replay(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step:  # resumed: the buffer saved with that checkpoint
                saved = torch.load(Path(args.output_dir) / f"checkpoint-{state.global_step}" / f"replay_{rank}.pt",
                                   weights_only=False)
                buffer.update(saved["buffer"])
                problems[:] = saved["problems"]

        def on_step_end(self, args, state, control, **kwargs):
            for group in trainer.groups:  # §3.3: every main-group completion can be replayed later
                problems.append(tokenrl.Problem(group["question"], int(group["answer"])))
                buffer["problem"] += [len(problems) - 1] * len(group["completions"])
                buffer["completion"] += [torch.tensor(c, dtype=torch.int32) for c in group["completions"]]
                buffer["reward"] += group["rewards"]
            seed = f"replay:{cfg.seed}:{state.global_step - 1}" + (f":{rank}" if rank else "")  # rank 0: tokenrl's
            chosen = sum(map(len, tokenrl.replay_choice(buffer["reward"], cfg.replay_threshold, cfg.replay_success,
                                                        cfg.replay_fail, rng=random.Random(seed))))  # what it will pick
            most = chosen
            if world > 1:  # every process steps as often: those with fewer replays step zero gradients
                count = torch.tensor([chosen], device=trainer.accelerator.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                most = int(count)
            steps = AveragedSteps(trainer.optimizer, [p for p in module.parameters() if p.requires_grad], world)
            module.train(False)  # tokenrl samples and scores in eval mode: no dropout
            groups, figures = tokenrl.replay_updates(module, tokenizer, problems, buffer, cfg=cfg, stop_ids=stop_ids,
                                                     pad_id=pad_id, optimizer=steps, rng=random.Random(seed))
            while steps.steps < most:
                steps.zero_grad()
                steps.step()
            module.train(True)
            figures["tokens/loss"] = sum(g["loss_tokens"] for g in groups)
            trainer.replay_figures = figures

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"buffer": buffer, "problems": problems}, folder / f"replay_{rank}.pt")

    return Replay()


def metrics_callback(trainer, out: Path):
    """metrics.jsonl in --out: one row a step under TRL's names, with tokens/loss and the replay figures."""
    from transformers import TrainerCallback

    class Rows(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            tokenrl.peak_memory_mb(trainer.accelerator.device, reset=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not trainer.accelerator.is_main_process or "loss" not in (logs or {}):
                return
            row = {"step": state.global_step, **logs, "time/step": time.perf_counter() - self.start,  # replay too
                   "memory/peak_mb": tokenrl.peak_memory_mb(trainer.accelerator.device)}  # process 0's
            figures = getattr(trainer, "replay_figures", None)
            if figures:
                row["tokens/loss"] = row.get("tokens/loss", 0) + figures.pop("tokens/loss")
                row.update(figures)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    return Rows()


# --- the command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """tokenrl.py's parser (its flags, defaults and one-line errors) and TRL's own flags under TRL's names."""
    parser = tokenrl.build_parser()
    parser.description = "tokenrl's S-GRPO / T-SPMO (with replay) on TRL's GRPOTrainer, on one process or many."
    for name, (kind, default, help_text) in TRL_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"TRL: {help_text}")
        else:
            parser.add_argument(flag, type=kind, help=f"TRL: {help_text} [default: {default}]")
    return parser


def parse(argv: list[str] | None) -> tuple[tokenrl.Config, dict]:
    """(tokenrl's Config, TRL's settings) from the command line, every value checked."""
    given = vars(build_parser().parse_args(argv))
    trl_given = {name: given.pop(name, default) for name, (_, default, _) in TRL_FLAGS.items()}
    if given.get("resume"):
        raise TrlError("--resume is tokenrl.py's; on TRL, pass --resume-from-checkpoint last (or a checkpoint-N)")
    given.setdefault("out", f"runs/trl-{given.get('algo', 'sgrpo')}-{given.get('task', 'svamp')}")
    cfg = tokenrl.resolve_config(tokenrl.Config(**given))
    if cfg.batch_size != 1:
        raise TrlError("--batch-size is tokenrl.py's; on TRL, each process takes a group a micro-batch: use "
                       "--gradient-accumulation-steps, or more processes")
    if cfg.algo != "tspmo" and cfg.replay_success + cfg.replay_fail:
        cfg = dataclasses.replace(cfg, replay_success=0, replay_fail=0)  # replay is T-SPMO's (§3.3)
    trl_given["per_device_train_batch_size"] = trl_given["per_device_train_batch_size"] or cfg.group_size
    whole_groups(trl_given["per_device_train_batch_size"], cfg.group_size, trl_given["steps_per_generation"],
                 cfg.algo)
    if trl_given["use_vllm"] and importlib.util.find_spec("vllm") is None:
        raise TrlError("--use-vllm needs vLLM: pip install vllm (or drop --use-vllm)")
    if cfg.pass_tokens is None:  # replay's tokenrl updates: its budget for the device
        cfg.pass_tokens = tokenrl.PASS_TOKENS["cuda" if tokenrl.run_device(cfg).type == "cuda" else "cpu"]
    return cfg, trl_given


def app_b_reward(completions: list[str], answer: list[int], **kwargs) -> list[float]:
    """App. B's last-integer reward as a TRL reward function; `answer` is the dataset's column."""
    return [tokenrl.reward(text, int(a)) for text, a in zip(completions, answer)]


def build_trainer(cfg: tokenrl.Config, settings: dict, model=None, tokenizer=None, problems=None):
    """The trainer for cfg.algo: tokenrl's model loading, LoRA (§4.1), problems and prompts (App. A), reward (App. B),
    with TRL's GRPOConfig set so that its GRPO loss is Eq. 5 (one update a group: the ratio is 1, no clip)."""
    from datasets import Dataset
    from trl import GRPOConfig

    sgrpo, tspmo = trainers()
    if model is None:
        model, tokenizer = tokenrl.load_model(cfg.model, tokenrl.DTYPES[cfg.dtype], torch.device("cpu"))
        torch.manual_seed(cfg.seed)  # LoRA's A starts random: the same --seed, the same start on every process
        model = tokenrl.add_lora(model, cfg.lora_rank, cfg.lora_fraction, lora_alpha=cfg.lora_alpha,
                                 targets=cfg.lora_targets.split(","))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.hf_quantizer, base.is_quantized = None, False  # a GGUF model is float weights: Trainer may train it
    base.config.__dict__.pop("quantization_config", None)
    if problems is None:  # each process takes its own problem a step: tokenrl.py's problems, in its order
        problems, _ = tokenrl.load_task(dataclasses.replace(cfg, batch_size=int(os.environ.get("WORLD_SIZE", 1))))
    dataset = Dataset.from_list([{"prompt": tokenizer.decode(tokenrl.encode_prompt(cfg.task, p, tokenizer)),
                                  "answer": p.answer, "question": p.question} for p in problems])
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    args = GRPOConfig(
        output_dir=cfg.out, max_steps=cfg.steps, per_device_train_batch_size=settings["per_device_train_batch_size"],
        num_generations=cfg.group_size, steps_per_generation=settings["steps_per_generation"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"], max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=1.0, top_k=0, beta=0.0 if cfg.algo == "tspmo" else cfg.beta,
        loss_type="grpo", use_bias_correction_kl=False, num_iterations=1, scale_rewards="group",
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, shuffle_dataset=False, seed=cfg.seed, logging_steps=1,
        report_to=[] if cfg.report_to == "none" else tokenrl.trackers_of(cfg.report_to), save_strategy="steps",
        save_steps=settings["save_steps"], use_cpu=not cuda, bf16=cuda and cfg.dtype == "bfloat16",
        gradient_checkpointing=settings["gradient_checkpointing"], use_vllm=settings["use_vllm"],
        vllm_mode="colocate", vllm_gpu_memory_utilization=settings["vllm_gpu_memory_utilization"],
        disable_tqdm=False, ddp_find_unused_parameters=False)
    trainer = (tspmo if cfg.algo == "tspmo" else sgrpo)(
        model=model, reward_funcs=app_b_reward, args=args, train_dataset=dataset, processing_class=tokenizer, cfg=cfg)
    out = Path(cfg.out)
    trainer.add_callback(metrics_callback(trainer, out))
    if cfg.algo == "tspmo" and cfg.replay_success + cfg.replay_fail:
        trainer.add_callback(replay_callback(trainer, cfg, tokenizer, out))
    return trainer


def main(argv: list[str] | None = None) -> int:
    try:
        check_trl()
        cfg, settings = parse(argv)
        out = Path(cfg.out)
        resume = settings["resume_from_checkpoint"]
        if not resume and (out / "metrics.jsonl").exists():
            raise TrlError(f"{out} already holds a run; pass --resume-from-checkpoint last, or choose another --out")
        if resume == "last":
            found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            if not found:
                raise TrlError(f"--resume-from-checkpoint last: {out} holds no checkpoint-N folder")
            resume = str(found[-1])
    except (TrlError, tokenrl.ConfigError) as error:
        print(f"trl_train: error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    with tokenrl.quiet():
        trainer = build_trainer(cfg, settings)
    if trainer.accelerator.is_main_process:
        tokenrl.write_atomic(out / "config.json", json.dumps({**dataclasses.asdict(cfg), "trl": settings}, indent=2))
        if resume:  # the rows after the checkpoint go: the resumed steps write them again
            step = int(Path(resume).name.split("-")[1])
            kept = [r for r in tokenrl.read_metrics(out / "metrics.jsonl") if r["step"] <= step]
            tokenrl.write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    with tokenrl.quiet():
        trainer.train(resume_from_checkpoint=resume or None)
    if trainer.accelerator.is_main_process:
        tokenrl.save_adapter(trainer.accelerator.unwrap_model(trainer.model), out / "adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
