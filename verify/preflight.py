"""Checks of a run's arguments before any work: the kind of path each names, the --inputs file's
tensors, and the memory a run will need.

Each failure is a verify.errors class (one line, exit status 2 from `python -m verify`) whose
message starts with the argument and its value, e.g.
    --inputs acts.safetensors: tensor x_ffn holds 3 NaN and 0 Inf values (first at [0, 17])
    --json out: invalid value (a directory; give the path of a file to write)
    --tokens 10000000: needs about 2.6 TB (estimate), this machine has 21.3 GB free
Nothing here loads a layer: the checkpoint is read only through its config and headers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from verify.errors import InputsError, ResourceError, UsageError
from verify.layer_ranges import format_layers

__all__ = ["existing_file", "writable_file", "writable_dir", "read_inputs_file", "check_inputs_for_layers",
           "estimate_run_bytes", "free_memory_bytes", "check_memory", "human_bytes", "INPUT_TENSORS"]

# the tensors an --inputs file may hold: name -> what it is (the messages quote these)
INPUT_TENSORS = {"x_ffn": "[T, hidden_size] float (required)", "x_attn": "[T, hidden_size] float (default x_ffn)",
                 "token_ids": "[T] integer (required by hash-routed layers)"}


# ----------------------------------------------------------------------------- paths


def existing_file(path: str | os.PathLike, argument: str) -> Path:
    """`path` when it is a readable file; else UsageError saying what it is instead."""
    p = Path(path)
    if not p.exists():
        why = "no such file" + (f"; directory {p.parent} does not exist" if not p.parent.exists() else "")
    elif p.is_dir():
        why = "a directory, not a file"
    elif not p.is_file():
        why = "not a regular file"
    elif not os.access(p, os.R_OK):
        why = "cannot read it: permission denied"
    else:
        return p
    raise UsageError(f"{argument} {path}: invalid value ({why})", argument=argument)


def writable_file(path: str | os.PathLike, argument: str) -> Path:
    """`path` when a file can be written there: not a directory, its parent an existing writable
    directory; else UsageError saying which."""
    p = Path(path)
    parent = p.resolve().parent
    if p.is_dir():
        why = "a directory; give the path of a file to write"
    elif p.exists() and not os.access(p, os.W_OK):
        why = "cannot write it: permission denied"
    elif not parent.exists():
        why = f"directory {p.parent} does not exist"
    elif not parent.is_dir():
        why = f"{p.parent} is a file, not a directory"
    elif not os.access(parent, os.W_OK):
        why = f"cannot write in {p.parent}: permission denied"
    else:
        return p
    raise UsageError(f"{argument} {path}: invalid value ({why})", argument=argument)


def writable_dir(path: str | os.PathLike, argument: str) -> Path:
    """`path` when it is a writable directory or can be created (its nearest existing ancestor is a
    writable directory); else UsageError saying which."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{argument} {path}: invalid value (a file, not a directory)", argument=argument)
        if not os.access(p, os.W_OK):
            raise UsageError(f"{argument} {path}: invalid value (cannot write in it: permission denied)",
                             argument=argument)
        return p
    ancestor = p.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{argument} {path}: invalid value (cannot create it: {ancestor} is a file)", argument=argument)
    if not os.access(ancestor, os.W_OK):
        raise UsageError(f"{argument} {path}: invalid value (cannot create it in {ancestor}: permission denied)",
                         argument=argument)
    return p


# ----------------------------------------------------------------------------- --inputs


def _inputs_error(path, text: str) -> InputsError:
    return InputsError(f"--inputs {path}: {text}", argument="--inputs")


def _first_nonfinite(t: torch.Tensor) -> str:
    bad = (~torch.isfinite(t)).nonzero()
    return str(list(bad[0].tolist())) if bad.numel() else "-"


def read_inputs_file(path: str | os.PathLike, *, hidden_size: int, vocab_size: int | None = None) -> dict:
    """The tensors of an --inputs safetensors file (INPUT_TENSORS), on the CPU, each checked: the file
    is a safetensors file, x_ffn is there, x_ffn / x_attn are 2-D float [T, hidden_size] with T >= 1 and
    every value finite, token_ids an integer [T] in [0, vocab_size). Any problem is an InputsError
    naming the file and the tensor. Returns {"x_ffn", "x_attn", "token_ids" (or None)}."""
    existing_file(path, "--inputs")
    try:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in INPUT_TENSORS if n in names}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ValueError
        raise _inputs_error(path, f"not a safetensors file ({' '.join(str(e).split())[:160] or type(e).__name__})") \
            from None
    if "x_ffn" not in tensors:
        have = ", ".join(sorted(names)) or "no tensors"
        raise _inputs_error(path, f"no tensor x_ffn {INPUT_TENSORS['x_ffn']} (it holds {have})")
    x_ffn = tensors["x_ffn"]
    for name in ("x_ffn", "x_attn"):
        t = tensors.get(name)
        if t is None:
            continue
        if not t.is_floating_point():
            raise _inputs_error(path, f"tensor {name} has dtype {t.dtype}, expected a float dtype "
                                      f"({INPUT_TENSORS[name]})")
        if t.dim() != 2 or t.shape[1] != hidden_size:
            raise _inputs_error(path, f"tensor {name} has shape {list(t.shape)}, expected [T, {hidden_size}] "
                                      f"(T tokens x the checkpoint's hidden_size)")
        if t.shape[0] == 0:
            raise _inputs_error(path, f"tensor {name} has shape {list(t.shape)}: no tokens")
        if name == "x_attn" and t.shape != x_ffn.shape:
            raise _inputs_error(path, f"tensor x_attn has shape {list(t.shape)}, x_ffn {list(x_ffn.shape)}: "
                                      "expected the same")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise _inputs_error(path, f"tensor {name} holds {nan} NaN and {inf} Inf values (first at "
                                      f"{_first_nonfinite(t)}); inputs must be finite")
        # bf16 is what the layer runs on: a finite float32 value above bf16's range would become Inf there
        as_bf16 = t.to(torch.bfloat16)
        if not bool(torch.isfinite(as_bf16).all()):
            raise _inputs_error(path, f"tensor {name} holds values beyond bfloat16's range (first at "
                                      f"{_first_nonfinite(as_bf16)}); the layer runs in bfloat16")
    ids = tensors.get("token_ids")
    if ids is not None:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise _inputs_error(path, f"tensor token_ids has dtype {ids.dtype}, expected an integer dtype")
        if ids.dim() != 1 or ids.shape[0] != x_ffn.shape[0]:
            raise _inputs_error(path, f"tensor token_ids has shape {list(ids.shape)}, expected [{x_ffn.shape[0]}] "
                                      "(one id per row of x_ffn)")
        ids = ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
            bad = int(((ids < 0) | (ids >= (vocab_size or 2**62))).nonzero()[0])
            raise _inputs_error(path, f"tensor token_ids holds {int(ids[bad])} at [{bad}], outside the vocabulary "
                                      f"[0, {vocab_size})")
    return {"x_ffn": x_ffn, "x_attn": tensors.get("x_attn", x_ffn), "token_ids": ids}


def check_inputs_for_layers(path, inputs: dict, config, layers) -> None:
    """An --inputs file without token_ids cannot drive a hash-routed layer (V4's first num_hash_layers)."""
    hashed = [i for i in layers if config.is_hash_layer(i)]
    if hashed and inputs["token_ids"] is None:

        raise _inputs_error(path, f"no tensor token_ids {INPUT_TENSORS['token_ids']}: layer(s) "
                                  f"{format_layers(hashed)} route by token id (hash routing)")


# ----------------------------------------------------------------------------- memory


# Per token, the references keep every stage's output in both modes (float64 high precision, bf16 /
# float32 emulated) and the backend's outputs beside them; the peak during a layer is about twice
# what is kept (temporaries of the widest stage). Measured on mini-v4 (hidden 256, top-k 6): 103 kB kept
# and 210 kB peak per token; this model gives 278 kB (an estimate that errs high).
BYTES_PER_ELEMENT = 8 + 4 + 4   # high float64 + emulated + backend output
PEAK_FACTOR = 2.0


def _elements_per_token(cfg) -> int:
    """Stage-output elements one token produces across the layer's stages (see BYTES_PER_ELEMENT)."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    routed = cfg.top_k * (2 * h + 4 * i)               # act_quant and l2 rows of width h; gate, up, swiglu, requant
    shared = max(cfg.n_shared_experts, 1) * 4 * i + h  # the shared expert (or V3's dense MLP) and its output
    dense = (cfg.intermediate_size or 0) * 4
    attn = 2 * (cfg.q_lora_rank or 0) + cfg.n_heads * (cfg.head_dim or cfg.v_head_dim or 0) + 4 * h
    return routed + shared + dense + attn + 4 * h      # combine, out and the inputs


def estimate_run_bytes(cfg, *, tokens: int, layer_nbytes: int) -> int:
    """Bytes one layer's run needs at `tokens` tokens: its weights (stored size, one layer at a time)
    plus the per-token stage outputs (see BYTES_PER_ELEMENT, PEAK_FACTOR). An estimate that errs high."""
    return int(layer_nbytes + PEAK_FACTOR * BYTES_PER_ELEMENT * _elements_per_token(cfg) * tokens)


def free_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes free, what was measured) on `device`: the GPU's free memory on cuda, else the host's
    MemAvailable (/proc/meminfo), else physical memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"{device} has"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine has"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has (physical)"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def check_memory(cfg, *, tokens: int, layer_nbytes: int, device: torch.device, what: str,
                 argument: str = "--tokens") -> int:
    """The estimate of estimate_run_bytes, or ResourceError (its message starts with `what`, e.g.
    "--tokens 10000000") when it exceeds the device's free memory."""
    need = estimate_run_bytes(cfg, tokens=tokens, layer_nbytes=layer_nbytes)
    free, where = free_memory_bytes(device)
    if need > free:
        per_token = (need - layer_nbytes) / tokens
        fits = max(0, int((free - layer_nbytes) // per_token))
        raise ResourceError(f"{what}: needs about {human_bytes(need)} (estimate: "
                            f"{human_bytes(per_token)} per token + {human_bytes(layer_nbytes)} of weights), {where} "
                            f"{human_bytes(free)} free; at most about {fits} tokens fit", argument=argument)
    return need
