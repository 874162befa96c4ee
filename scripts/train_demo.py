"""Train the built-in demo model: a small OLMoE on the Python standard library's own source.

    python scripts/train_demo.py --out cluster/demo_model

Steps: collect the stdlib's ``*.py`` files (sorted; every ``--val-every``-th file held out), learn a
byte-level BPE on the training files, train ``OlmoeForCausalLM`` (AdamW, warmup + cosine, router
load-balancing loss on), save it with ``save_pretrained`` plus the tokenizer and a README, and print
a JSON summary with losses and routing statistics.

Deterministic for a given Python stdlib, torch build and thread count: every random draw comes from
``--seed``. The corpus is whatever stdlib runs this script (the shipped model's README names it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread, deterministic merges

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, OlmoeConfig, PreTrainedModel  # noqa: E402

from experts.tokenizer_build import EOS_TOKEN, train_byte_bpe, write_tokenizer  # noqa: E402

# Path parts that mark generated tables, test data or third-party code rather than ordinary source.
SKIP_PARTS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"})


@dataclass(frozen=True, slots=True)
class TrainConfig:
    out: Path
    seed: int = 0
    threads: int = 1
    val_every: int = 20  # every n-th corpus file (sorted) is held out for validation
    max_file_bytes: int = 200_000  # larger files are mostly data tables
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    moe_intermediate: int = 128
    max_positions: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 500
    warmup: int = 40
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    eval_every: int = 100
    val_windows: int = 64

    def __post_init__(self) -> None:
        for name in ("threads", "val_every", "max_file_bytes", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "num_experts", "top_k", "moe_intermediate", "seq_len", "batch_size",
                     "steps", "eval_every", "val_windows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.val_windows % 2:
            raise ValueError(f"val_windows must be even (half fit, half score routes), got {self.val_windows}")
        if self.top_k > self.num_experts or self.num_heads % self.num_kv_heads:
            raise ValueError("need top_k <= num_experts and num_heads a multiple of num_kv_heads")
        if self.seq_len > self.max_positions:
            raise ValueError(f"seq_len {self.seq_len} > max_positions {self.max_positions}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")


def corpus_files(max_bytes: int) -> list[Path]:
    """The stdlib's ordinary ``*.py`` files, sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not SKIP_PARTS & set(p.relative_to(root).parts) and p.stat().st_size <= max_bytes]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_texts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(train texts, validation texts); undecodable files are skipped."""
    train, val = [], []
    for i, path in enumerate(corpus_files(cfg.max_file_bytes)):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        (val if i % cfg.val_every == cfg.val_every - 1 else train).append(text)
    if not train or not val:
        raise ValueError(f"corpus too small: {len(train)} train and {len(val)} validation files")
    return train, val


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts encoded, each followed by eos: [N] int64."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(cfg: TrainConfig, eos_id: int) -> PreTrainedModel:
    config = OlmoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        intermediate_size=cfg.moe_intermediate, moe_intermediate_size=cfg.moe_intermediate,
        max_position_embeddings=cfg.max_positions, router_aux_loss_coef=cfg.aux_loss_coef,
        tie_word_embeddings=False, eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None)
    config._experts_implementation = "grouped_mm"  # same math as eager, faster on CPU
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = None
    return model


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr``, then cosine down to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def val_windows(cfg: TrainConfig, stream: torch.Tensor) -> torch.Tensor:
    """Evenly spaced validation windows: [val_windows, seq_len]."""
    span = cfg.seq_len
    if len(stream) < span * cfg.val_windows:
        raise ValueError(f"validation stream has {len(stream)} tokens, need {span * cfg.val_windows}")
    starts = torch.linspace(0, len(stream) - span, cfg.val_windows).long()
    return torch.stack([stream[s:s + span] for s in starts.tolist()])


@torch.no_grad()
def val_loss(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=w, labels=w).loss.item() * len(w) for w in windows.split(batch_size)]
    model.train()
    return sum(losses) / len(windows)


def train(cfg: TrainConfig, model: PreTrainedModel, stream: torch.Tensor, val: torch.Tensor) -> list[dict]:
    """Run ``cfg.steps`` AdamW steps on random training windows; returns the eval log."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.seq_len)
    log, recent = [], []
    bar = tqdm(range(cfg.steps), desc="train", unit="step", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size, 1), generator=gen)
        ids = stream[starts + offsets]  # [B, T]
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(out.loss.item() - cfg.aux_loss_coef * out.aux_loss.item())
        bar.set_postfix(loss=f"{recent[-1]:.3f}", aux=f"{out.aux_loss.item():.3f}", refresh=False)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "train_loss": round(sum(recent) / len(recent), 4),
                     "val_loss": round(val_loss(model, val, cfg.batch_size), 4)}
            log.append(entry)
            bar.write(json.dumps(entry))
            recent = []
    return log


@torch.no_grad()
def top_experts(model: PreTrainedModel, windows: torch.Tensor, top_k: int, batch_size: int) -> torch.Tensor:
    """Each token's top-k experts per layer: [L, N, k] for the N tokens of ``windows`` (row-major)."""
    model.eval()
    parts = []
    for w in windows.split(batch_size):
        logits = model.model(input_ids=w, output_router_logits=True).router_logits  # L x [b*T, E]
        parts.append(torch.stack([layer.topk(top_k, dim=-1).indices for layer in logits]))
    return torch.cat(parts, dim=1)


def routing_stats(experts: torch.Tensor, num_experts: int) -> dict:
    """Popularity entropy per layer (1.0 = uniform) and held-out best-transition accuracy per layer pair.

    The transition table (top-1 at layer l -> most frequent top-1 at l+1) is fit on the first half of
    the tokens and scored on the second half; a uniform, independent router scores 1/num_experts.
    """
    counts = torch.stack([torch.bincount(layer.flatten(), minlength=num_experts) for layer in experts]).double()
    probs = counts / counts.sum(dim=1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1) / math.log(num_experts)
    top1, half = experts[..., 0], experts.shape[1] // 2
    accuracy = []
    for src, dst in zip(top1[:-1], top1[1:]):
        table = torch.bincount(src[:half] * num_experts + dst[:half], minlength=num_experts ** 2)
        best = table.view(num_experts, num_experts).argmax(dim=1)  # [E] predicted next top-1
        accuracy.append((best[src[half:]] == dst[half:]).double().mean().item())
    return {"popularity_entropy_over_uniform": [round(e, 4) for e in entropy.tolist()],
            "best_transition_accuracy": [round(a, 4) for a in accuracy],
            "uniform_transition_accuracy": round(1 / num_experts, 4)}


@torch.no_grad()
def sample(model: PreTrainedModel, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def write_readme(out: Path, summary: dict) -> None:
    text = f"""# Built-in demo model ({summary['name']})

A {summary['params'] / 1e6:.2f}M-parameter OLMoE (`OlmoeForCausalLM`, {summary['config']['num_layers']} layers,
{summary['config']['num_experts']} experts, top-{summary['config']['top_k']}) with its own {summary['vocab_size']}-token
byte-level BPE, trained from scratch on the Python standard library's source code (Python
{summary['python']}, `*.py` files outside tests, encodings, pydoc_data and site-packages; every
{summary['config']['val_every']}th file held out for validation). Its routing is learned, not random: see
`routing` below. Made by

    {summary['command']}

Summary printed by that run (losses are per-token cross-entropy in nats):

```json
{json.dumps(summary, indent=2)}
```
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def run(cfg: TrainConfig) -> dict:
    started = time.monotonic()
    torch.set_num_threads(cfg.threads)
    train_texts, val_texts = split_texts(cfg)
    tokenizer = train_byte_bpe(train_texts, cfg.vocab_size)
    stream, val_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    model = build_model(cfg, tokenizer.token_to_id(EOS_TOKEN))
    val = val_windows(cfg, val_stream)
    initial = val_loss(model, val, cfg.batch_size)
    log = train(cfg, model, stream, val)
    experts = top_experts(model, val, cfg.top_k, cfg.batch_size)  # [L, N, k]
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out)
    write_tokenizer(tokenizer, cfg.out)
    for path in cfg.out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the shipped files are world-readable
    final = log[-1]["val_loss"]
    val_bytes = sum(len(t.encode()) + 1 for t in val_texts)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "corpus": {"train_files": len(train_texts), "val_files": len(val_texts),
                   "train_tokens": len(stream), "val_tokens": len(val_stream),
                   "val_bytes_per_token": round(val_bytes / len(val_stream), 3)},
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "initial_val_loss": round(initial, 4), "final_val_loss": final,
        "final_val_perplexity": round(math.exp(final), 2),
        "final_val_bits_per_byte": round(final * len(val_stream) / val_bytes / math.log(2), 3),
        "log": log, "routing": routing_stats(experts, cfg.num_experts),
        "sample": sample(model, tokenizer, "def fibonacci(n):"),
        "wall_time_s": round(time.monotonic() - started, 1),
        "checkpoint_bytes": sum(p.stat().st_size for p in cfg.out.iterdir()),
    }


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created; files replaced)")
    parser.add_argument("--name", default="demo-olmoe-stdlib-v1", help="model name written into the README")
    for key in ("seed", "threads", "steps", "warmup", "batch_size", "seq_len", "vocab_size", "eval_every",
                "val_windows"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=TrainConfig.__dataclass_fields__[key].default)
    parser.add_argument("--lr", type=float, default=TrainConfig.__dataclass_fields__["lr"].default)
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "name"}
    return TrainConfig(**fields), args.name


def main(argv: list[str] | None = None) -> None:
    cfg, name = parse_args(argv)
    summary = {"name": name, **run(cfg)}
    summary["command"] = shlex.join(["python", "scripts/train_demo.py", *(sys.argv[1:] if argv is None else argv)])
    summary["python"] = platform.python_version()
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    write_readme(cfg.out, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
