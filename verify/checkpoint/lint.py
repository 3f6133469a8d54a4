"""Checkpoint lint: `python -m verify lint --checkpoint DIR [--json PATH]` and the `lint` marker.

Findings are data (severity, code, tensor, message, numbers), rendered as a rich table
and as JSON; any `error` finding makes the exit status non-zero.

Checks, first for the whole checkpoint (config values, names, headers and file sizes only, no
tensor data):
  config      every config value (Checkpoint.open: ConfigValueError, one error finding, nothing
              else checked) and the config against the tensor names and the other config file
              (Checkpoint.consistency_errors: layers past num_hidden_layers, experts past
              n_routed_experts, config.json's quantization_config vs hf_quant_config.json)
  structure   every file the index names and every *.safetensors file: the header against the file
              size (truncated, padded, offsets that overlap / leave gaps / do not start at 0 / are not
              in header order, byte count != prod(shape) * itemsize, unknown dtype, malformed header),
              and the index against the headers (missing file, a tensor the named file lacks, a
              tensor or file the index does not list); codes in STRUCTURE_DEFECT_CODES, each an error
              naming the file and the tensor. A layer with a tensor in a file with structural errors
              is not checked further (one `layer_not_checked` warning).
then per layer:
  schema      every tensor's dtype and shape against the schema (each defect is one finding);
              quant_algo against the stored formats (NVFP4 weights under quant_algo FP8)
  fp8         the scale encoding of each FP8 linear (info fp8_encoding: v4_e8m0_scale,
              v3_weight_scale_inv, ct_fp8_block, modelopt_fp8_pb_wo, per_tensor); a scale of no known
              encoding, a block grid not [ceil(N/128), ceil(K/128)] (transposed named), a 4-D grid
              not [out_blk, 1, in_blk, 1] are schema errors
  values      NaN scale bytes (E4M3 0x7F/0xFF, E8M0 0xFF); zero/negative/NaN/Inf
              weight_scale_2, input_scale, FP8 float block scales; FP8 float block scales that are
              E8M0 bytes stored as numbers (e8m0_bytes_as_numbers); a weight whose block scales are all
              zero; NaN/Inf in norm, router, unquantized and FP8 weights; hash-routing expert ids
              out of [0, n_routed_experts) (values.value_defects: the errors the loader raises)
  plausible   weight_scale_2 / input_scale whose implied amax is implausible (an inverted scale,
              1e30, 1e-42): warnings with the value (values.plausibility_warnings)
  fused       w1/w3 weight_scale_2 and input_scale mismatch (count, max relative difference)
  saturation  fraction of NVFP4 block scales at 448 (0x7E) and at 0 (0x00/0x80)
  nibbles     nibble-order statistic (below)
  mtp         (whole checkpoint, DeepSeek-V4) each MTP block mtp.{j}.* loaded as its stages read it: defects are
              errors naming the tensor; info fp8_encoding for e_proj / h_proj and mtp_mxfp4_experts for
              the MXFP4 expert stacks
  requant     the re-quantization contract: every NVFP4 block decoded with its stored scales and
              re-quantized by the checkpoint's recipe (--weight-recipe, default modelopt) with references'
              codec; blocks whose codes do not come back are counted (error requant_mismatch, the first
              named: tensor, expert, row, block), blocks the recipe cannot reproduce by design (subnormal
              or clamped scales, ties, zero scales) are classed (info requant_by_design). What "by design"
              means, what no byte-level check can see, and why a block whose largest code is 6 under a
              normal scale skips the codec (it provably comes back): verify.checkpoint.requant.
  exclude     exclude_modules consistency: an excluded module stored as NVFP4, or a
              non-NVFP4 linear that an NVFP4 config does not exclude; patterns matching nothing
  declared    the config's declared format per module against the stored one (error
              declared_format_mismatch naming the module): quant_algo FP8 (DeepSeek-V4's
              quantization_config, quant_method fp8) declares every non-excluded linear FP8 and the
              excluded ones unquantized; MIXED_PRECISION's quantized_layers declares each listed module's
              format (an FP8 module stored as BF16, an NVFP4 module stored as FP8, ...)

Nibble-order statistic. Swapping the two nibbles of every byte exchanges columns 2i and 2i+1
of a weight; the block scales (16 columns) do not move, so no statistic of one block or of one
tensor can see it. What does see it is structure shared across tensors along an axis whose
order is unambiguous in one tensor and packed in the other. In an MLP, intermediate channel j
is row j of w1/w3 (rows are never packed) and column j of w2 (packed); hidden channel c is row c
of w2 and column c of w1/w3. Trained MLPs (and the fixtures, by construction) carry per-channel
gains on both sides: neuron norms of w1/w3 rows track w2 column norms, and the residual stream's
outlier channels show in both w2 rows and w1/w3 columns. Per expert we take log row energies
(reference order) and log column energies (decoded low nibble first), and compute the Pearson
correlation r_id with the columns as decoded and r_sw with each column pair exchanged. The
score is the mean of (r_id - r_sw) over experts and both axes, with a z value over experts:
score > 0 with z >= Z_DECIDE: order is low-first (ok); score < 0 with z <= -Z_DECIDE: swapped
(error); otherwise inconclusive (info).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from references.nvfp4 import decode_nvfp4_block_scaled
from references.recipes import RECIPES, Recipe
from verify.checkpoint import (
    Checkpoint, CheckpointError, Fp8BlockLinear, GatedMlp, LayerWeights, MalformedShardError, Nvfp4Linear,
    check_linear_k, check_tensor, iter_linears, layer_schema, linear_format_of, linear_tensor_specs,
    plausibility_warnings, structure_defects, value_defects,
)
from verify.checkpoint.requant import requant_contract

__all__ = ["Finding", "LintReport", "lint_checkpoint", "nibble_order_score", "add_lint_arguments", "cli_lint",
           "Z_DECIDE", "SATURATION_WARN_FRACTION", "DEFAULT_WEIGHT_RECIPE", "declared_formats"]

Z_DECIDE = 4.0
SATURATION_WARN_FRACTION = 0.01
NIBBLE_MAX_EXPERTS = 16
SEVERITIES = ("error", "warning", "info")
DEFAULT_WEIGHT_RECIPE = "modelopt"  # how NVIDIA's (ModelOpt) exports and the fixtures quantize weights


@dataclass(frozen=True)
class Finding:
    """One lint result. severity: error | warning | info; code: stable identifier;
    tensor: the tensor (or module / layer) it concerns ("" for a whole file); numbers: the
    measured values; file: the checkpoint file it concerns, where one is known."""

    severity: str
    code: str
    tensor: str
    message: str
    numbers: Mapping[str, float] = field(default_factory=dict)
    file: str | None = None


@dataclass(frozen=True)
class LintReport:
    checkpoint: str
    schema: str
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def codes(self, severity: str | None = None) -> set[str]:
        return {f.code for f in self.findings if severity is None or f.severity == severity}

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "schema": self.schema,
                "counts": {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES},
                "findings": [asdict(f) | {"numbers": dict(f.numbers)} for f in self.findings]}


# ============================================================================= checks


def _schema_findings(ck: Checkpoint, i: int) -> list[Finding]:
    """Every dtype/shape/missing defect of layer i, one finding each (headers only)."""
    out: list[Finding] = []
    names = ck.layer_names(i)
    try:
        infos = ck.headers_for(names)
    except CheckpointError as e:
        return [_error_finding(e, f"layer {i}")]
    schema = layer_schema(ck.config, i).with_present(infos)
    for spec in schema.linear_specs():
        try:
            fmt = linear_format_of(spec.module, infos)
            check_linear_k(spec, fmt, infos[f"{spec.module}.weight"].file)
            tspecs = linear_tensor_specs(fmt, spec.module, spec.n, spec.k, infos)
        except CheckpointError as e:
            out.append(_error_finding(e, spec.module))
            continue
        for t in tspecs:
            out.extend(_check_one(ck, infos, t))
    for t in list(schema.norms) + list(schema.router):
        out.extend(_check_one(ck, infos, t))
    return out


def _stored_formats(ck: Checkpoint, i: int) -> dict[str, str]:
    """module -> stored format (schema.linear_format_of) of layer i's linears, from the headers alone, so the
    format checks see a layer whose schema findings stop its loading (e.g. NVFP4 under quant_algo FP8)."""
    try:
        infos = ck.headers_for(ck.layer_names(i))
    except CheckpointError:
        return {}
    out = {}
    for spec in layer_schema(ck.config, i).with_present(infos).linear_specs():
        try:
            out[spec.module] = linear_format_of(spec.module, infos)
        except CheckpointError:
            continue  # a schema finding of its own
    return out


def _check_one(ck: Checkpoint, infos, tspec) -> list[Finding]:
    info = infos.get(tspec.name)
    if info is None:
        where = ck.index_path or ck.directory
        return [Finding("error", "MissingTensorError", tspec.name, f"required by the schema, not in the weight_map "
                                                                   f"[file {where}]", file=str(where))]
    try:
        check_tensor(info, tspec)
    except CheckpointError as e:
        return [_error_finding(e, tspec.name)]
    return []


def _error_finding(e: CheckpointError, default_tensor: str) -> Finding:
    """A CheckpointError as an error finding: its class name is the code; tensor names the tensor,
    else the config key."""
    return Finding("error", type(e).__name__, e.tensor or e.key or default_tensor, str(e), file=e.file)


def _structure_findings(directory: str | Path) -> list[Finding]:
    """Every structural defect of the checkpoint's files and index (headers and sizes only)."""
    return [Finding("error", d.code, d.tensor or "", d.message, file=str(d.file)) for d in structure_defects(directory)]


def _value_findings(ck: Checkpoint, layer: LayerWeights, prefix: str) -> list[Finding]:
    """The loader's value defects (errors) and plausibility warnings of a loaded layer."""
    def file_of(tensor: str) -> str | None:
        shard = ck.weight_map.get(tensor)
        return str(ck.directory / shard) if shard else None

    out = [Finding("error", d.code, d.tensor, d.message, {} if d.value is None else {"value": d.value},
                   file=file_of(d.tensor)) for d in value_defects(layer, ck.config, prefix)]
    out += [Finding("warning", d.code, d.tensor, d.message, {"value": d.value}, file=file_of(d.tensor))
            for d in plausibility_warnings(layer)]
    return out


_FP8_ENCODING_TEXT = {
    "v4_e8m0_scale": "DeepSeek-V4 .scale F8_E8M0, 2^(b-127)",
    "v3_weight_scale_inv": "DeepSeek-V3 .weight_scale_inv F32",
    "ct_fp8_block": "compressed-tensors FP8_BLOCK .weight_scale",
    "modelopt_fp8_pb_wo": "ModelOpt FP8_PB_WO .weight_scale 4-D [out_blk, 1, in_blk, 1]",
    "per_tensor": "per-tensor .weight_scale (+ .input_scale)",
}


def _fp8_encoding_findings(ck: Checkpoint, layer: LayerWeights) -> list[Finding]:
    """One info finding per FP8 linear naming the scale encoding the loader found (code fp8_encoding,
    the message starts with the encoding's name: references.fp8_weight.FP8_WEIGHT_ENCODINGS)."""
    out = []
    for module, lin in iter_linears(layer):
        if isinstance(lin, Fp8BlockLinear):
            scale = f"{module}.{lin.scale_tensor_role}"
            shard = ck.weight_map.get(scale)
            out.append(Finding("info", "fp8_encoding", module,
                               f"{lin.encoding}: E4M3 weight {list(lin.weight_e4m3.shape)}, block scales "
                               f"{_FP8_ENCODING_TEXT[lin.encoding]} ({scale})",
                               file=str(ck.directory / shard) if shard else None))
    return out


def _fused_findings(mlp: GatedMlp | None) -> list[Finding]:
    if mlp is None or not (isinstance(mlp.w1, Nvfp4Linear) and isinstance(mlp.w3, Nvfp4Linear)):
        return []
    out = []
    for role in ("weight_scale_2", "input_scale"):
        a = getattr(mlp.w1, f"{role}_f32").reshape(-1).double()
        b = getattr(mlp.w3, f"{role}_f32").reshape(-1).double()
        diff = a != b
        n = int(diff.sum())
        if n:
            rel = ((a - b).abs() / torch.maximum(a.abs(), b.abs())).nan_to_num(nan=float("inf"))
            j = int(rel.argmax())
            out.append(Finding(
                "warning", f"w1_w3_{role}_mismatch", f"{mlp.w1.module}|w3.{role}",
                f"w1 and w3 {role} differ in {n} of {a.numel()} (max relative difference {float(rel[j]):.3g} at "
                f"index {j}: {float(a[j]):.6g} vs {float(b[j]):.6g}); a fused w1|w3 GEMM with one scale (vLLM, "
                "SGLang) is then wrong by that factor for w3", {"count": n, "max_rel_diff": float(rel[j])}))
    return out


def _saturation_findings(layer: LayerWeights) -> list[Finding]:
    out = []
    for module, lin in iter_linears(layer):
        if not isinstance(lin, Nvfp4Linear):
            continue
        b = lin.weight_scale_e4m3.view(torch.uint8)
        n = b.numel()
        f448 = float(((b & 0x7F) == 0x7E).sum()) / n
        f0 = float(((b & 0x7F) == 0x00).sum()) / n
        sev = "warning" if max(f448, f0) > SATURATION_WARN_FRACTION else "info"
        out.append(Finding(sev, "block_scale_saturation", f"{module}.weight_scale",
                           f"{f448:.2%} of block scales at 448, {f0:.2%} at 0",
                           {"frac_448": f448, "frac_0": f0, "count": n}))
    return out


def _log_energy(x_f32: Tensor, dim: int) -> Tensor:
    """log of the sum of squares along dim (float64 logs; a tiny floor keeps all-zero channels finite)."""
    e = x_f32.square().sum(dim).double()
    return torch.log(e + e.mean() * 1e-12 + 1e-300)


def _corr(a: Tensor, b: Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = math.sqrt(float(a.square().sum() * b.square().sum()))
    return float((a * b).sum()) / d if d > 0 else 0.0


def _pair_swap(v: Tensor) -> Tensor:
    return v.reshape(-1, 2).flip(-1).reshape(-1)


def nibble_order_score(mlp: GatedMlp, *, max_experts: int = NIBBLE_MAX_EXPERTS) -> dict[str, float]:
    """The nibble-order statistic of an NVFP4 (stacked or single) MLP: score, z, experts used.

    See the module docstring. Decoding is e2m1 * block scale (global scales do not matter:
    correlations are scale-free)."""
    w1, w3, w2 = mlp.w1, mlp.w3, mlp.w2
    stacked = w1.weight_u8.dim() == 3
    n_e = min(w1.weight_u8.shape[0] if stacked else 1, max_experts)

    def decoded(w: Nvfp4Linear) -> Tensor:  # [n_e, N, K] float32, NaN scales zeroed
        q, sf = w.weight_u8, w.weight_scale_e4m3.view(torch.uint8)
        q, sf = (q[:n_e], sf[:n_e]) if stacked else (q[None], sf[None])
        return torch.nan_to_num(decode_nvfp4_block_scaled(q, sf), nan=0.0)

    d1, d3, d2 = decoded(w1), decoded(w3), decoded(w2)
    # neuron axis: rows of w1/w3 (reference order) vs columns of w2 (packed order)
    a_ref = torch.logaddexp(_log_energy(d1, 2), _log_energy(d3, 2))
    a_col = _log_energy(d2, 1)
    # hidden axis: rows of w2 (reference order) vs columns of w1/w3 (packed order)
    b_ref = _log_energy(d2, 2)
    b_col = torch.logaddexp(_log_energy(d1, 1), _log_energy(d3, 1))
    diffs = []
    for e in range(n_e):
        for ref, col in ((a_ref[e], a_col[e]), (b_ref[e], b_col[e])):
            diffs.append(_corr(ref, col) - _corr(ref, _pair_swap(col)))
    t = torch.tensor(diffs, dtype=torch.float64)
    mean = float(t.mean())
    sd = float(t.std()) if t.numel() > 1 else 0.0
    z = mean / (sd / math.sqrt(t.numel())) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return {"score": mean, "z": z, "samples": float(t.numel()), "experts": float(n_e)}


def _nibble_findings(layer: LayerWeights) -> list[Finding]:
    out = []
    for label, mlp in (("experts", layer.experts), ("shared_experts", layer.shared_experts),
                       ("dense_mlp", layer.dense_mlp)):
        if mlp is None or not all(isinstance(w, Nvfp4Linear) for w in (mlp.w1, mlp.w3, mlp.w2)):
            continue
        s = nibble_order_score(mlp)
        where = mlp.w2.module
        if s["score"] > 0 and s["z"] >= Z_DECIDE:
            out.append(Finding("info", "nibble_order_ok", where,
                               f"low-nibble-first order confirmed (score {s['score']:.3f}, z {s['z']:.1f})", s))
        elif s["score"] < 0 and s["z"] <= -Z_DECIDE:
            out.append(Finding("error", "nibble_order_swapped", where,
                               f"nibbles appear swapped: columns match the reference better with each pair "
                               f"exchanged (score {s['score']:.3f}, z {s['z']:.1f})", s))
        else:
            out.append(Finding("info", "nibble_order_inconclusive", where,
                               f"nibble order statistic inconclusive (score {s['score']:.3f}, z {s['z']:.1f})", s))
    return out


def _requant_findings(layer: LayerWeights, recipe: Recipe) -> list[Finding]:
    """The re-quantization contract of every NVFP4 weight of a layer (verify.checkpoint.requant)."""
    out = []
    for module, lin in iter_linears(layer):
        if not isinstance(lin, Nvfp4Linear):
            continue
        r = requant_contract(f"{module}.weight", lin.weight_u8, lin.weight_scale_e4m3, lin.weight_scale_2_f32,
                             recipe=recipe)
        if r.flagged:
            e, row, blk = r.first_flagged
            where = ("" if e is None else f"expert {e}, ") + \
                f"row {row}, block {blk} (columns {16 * blk}..{16 * blk + 15})"
            out.append(Finding(
                "error", "requant_mismatch", r.tensor,
                f"{r.flagged} of {r.blocks} blocks do not come back when re-quantized from their stored scales "
                f"(recipe {recipe.name}); first at {where}: {r.first_reason}",
                {"flagged": r.flagged, "blocks": r.blocks, "row": row, "block": blk,
                 **({} if e is None else {"expert": e})}))
        if r.by_design:
            classes = ", ".join(f"{k} {v}" for k, v in sorted(r.by_design.items()))
            out.append(Finding("info", "requant_by_design", r.tensor,
                               f"{sum(r.by_design.values())} of {r.blocks} blocks do not come back by design "
                               f"(recipe {recipe.name}): {classes}", {"blocks": r.blocks, **r.by_design}))
    return out


# quant_algo / quantized_layers words -> the stored format they declare (verify.checkpoint.schema.linear_format_of)
_DECLARED = {"NVFP4": "nvfp4", "FP8": "fp8_block128", "FP8_PB_WO": "fp8_block128", "FP8_BLOCK": "fp8_block128",
             "W4A8_MXFP4_FP8": "mxfp4", "MXFP4": "mxfp4"}


def _quantized_layers(ck: Checkpoint) -> tuple[dict[str, str], str] | None:
    """hf_quant_config.json's MIXED_PRECISION `quantized_layers` {module: quant_algo}, with the file; None
    when absent (lint reads it here: the loader does not use it)."""
    path = Path(ck.directory) / "hf_quant_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the loader's own error, reported by Checkpoint.open
    q = raw.get("quantization", raw) if isinstance(raw, dict) else {}
    layers = q.get("quantized_layers") if isinstance(q, dict) else None
    if not isinstance(layers, dict):
        return None
    return {m: str(v.get("quant_algo", "")).upper() for m, v in layers.items() if isinstance(v, dict)}, str(path)


def declared_formats(ck: Checkpoint, modules) -> dict[str, tuple[str, str]]:
    """module -> (declared stored format, where it is declared) for the modules the config declares: every
    module under quant_algo FP8 (FP8 block-128, or "bf16" when excluded: unquantized), every module that
    MIXED_PRECISION's quantized_layers lists (its algo's format). quant_algo NVFP4 is _exclude_findings'."""
    out: dict[str, tuple[str, str]] = {}
    q = ck.quant
    if q is not None and q.quant_algo in ("FP8", "FP8_BLOCK", "FP8_PB_WO"):
        for m in modules:
            out[m] = ("bf16", f"{q.source} exclude_modules") if q.is_excluded(m) else ("fp8_block128", q.source)
    mixed = _quantized_layers(ck)
    if mixed is not None:
        layers, path = mixed
        for m in modules:
            algo = layers.get(m)
            if algo is not None and algo in _DECLARED:
                out[m] = (_DECLARED[algo], f"{path} quantized_layers[{m}] = {algo}")
    return out


def _declared_format_findings(ck: Checkpoint, formats: Mapping[str, str]) -> list[Finding]:
    out = []
    for module, (want, where) in sorted(declared_formats(ck, formats).items()):
        got = formats[module]
        if got != want:
            out.append(Finding("error", "declared_format_mismatch", module,
                               f"declared {want} ({where}) but stored as {got}: a loader that trusts the config "
                               f"builds this linear as {want}", {}))
    return out


def _exclude_findings(ck: Checkpoint, formats: Mapping[str, str]) -> list[Finding]:
    q = ck.quant
    if q is None:
        return []
    out = []
    for module, fmt in sorted(formats.items()):
        excluded = q.is_excluded(module)
        if excluded and fmt == "nvfp4":
            out.append(Finding("error", "excluded_but_nvfp4", module,
                               f"matches exclude_modules of {q.source} but is stored as NVFP4"))
        elif not excluded and fmt != "nvfp4" and q.quant_algo == "NVFP4":
            out.append(Finding("error", "not_excluded_but_" + fmt, module,
                               f"stored as {fmt} but quant_algo NVFP4 in {q.source} does not exclude it: "
                               "a loader would expect NVFP4 tensors"))
    all_modules = {n.rsplit(".", 1)[0] for n in ck.weight_map} | set(ck.weight_map)
    for pat in q.exclude_modules:
        if not any(fnmatch.fnmatchcase(m, pat) for m in all_modules):
            out.append(Finding("info", "exclude_pattern_unused", pat, "exclude_modules pattern matches no module"))
    return out


# ============================================================================= driver


def lint_checkpoint(directory: str | Path, *, layers: Iterable[int] | None = None,
                    weight_recipe: str = DEFAULT_WEIGHT_RECIPE) -> LintReport:
    """Lint a checkpoint directory; never raises for checkpoint defects (they become findings).
    LayerRangeError (naming --layers) when `layers` holds an index past num_hidden_layers.
    weight_recipe: the recipe the checkpoint's NVFP4 weights were quantized with (references.recipes
    name), for the re-quantization contract."""
    recipe = RECIPES[weight_recipe]
    structure = _structure_findings(directory)
    try:
        ck = Checkpoint.open(directory, check=False)
    except CheckpointError as e:
        # A shard defect that stops open (one shard, no index) is already among the structure findings.
        opened = [] if structure and isinstance(e, MalformedShardError) else [_error_finding(e, str(directory))]
        return LintReport(str(directory), "?", tuple(_sorted(structure + opened)))
    findings: list[Finding] = list(structure) + [_error_finding(e, str(directory)) for e in ck.consistency_errors()]
    broken = {f.file for f in structure}
    formats: dict[str, str] = {}
    todo = list(layers) if layers is not None else list(range(ck.config.num_layers))
    past = [i for i in todo if i >= ck.config.num_layers]
    if past:
        from verify.config import format_layers
        from verify.errors import LayerRangeError

        raise LayerRangeError(f"--layers {format_layers(past)}: layer out of range (checkpoint {directory} has "
                              f"layers {format_layers(range(ck.config.num_layers))})", argument="--layers")
    for i in todo:
        names = ck.layer_names(i)
        if not names:
            findings.append(Finding("warning", "layer_absent", layer_schema(ck.config, i).prefix,
                                    "no tensor of this layer is in the weight_map"))
            continue
        bad = sorted({str(ck.directory / ck.weight_map[n]) for n in names} & broken)
        if bad:
            findings.append(Finding("warning", "layer_not_checked", layer_schema(ck.config, i).prefix,
                                    f"not checked: {len(bad)} of its files have structural errors (first "
                                    f"{Path(bad[0]).name})", file=bad[0]))
            continue
        formats.update(_stored_formats(ck, i))
        schema_f = _schema_findings(ck, i)
        findings.extend(schema_f)
        if any(f.severity == "error" for f in schema_f):
            continue
        try:
            plan = ck.plan_layer(i)
            layer = ck.load_layer(i, check_values=False)
        except CheckpointError as e:
            findings.append(_error_finding(e, f"layer {i}"))
            continue
        for n in plan.extras:
            findings.append(Finding("info", "unknown_tensor", n, "not in the schema; loaded as stored"))
        findings.extend(_fp8_encoding_findings(ck, layer))
        findings.extend(_value_findings(ck, layer, plan.schema.prefix))
        for mlp in (layer.experts, layer.shared_experts, layer.dense_mlp):
            findings.extend(_fused_findings(mlp))
        findings.extend(_saturation_findings(layer))
        findings.extend(_nibble_findings(layer))
        findings.extend(_requant_findings(layer, recipe))
    if layers is None:
        findings.extend(_mtp_findings(ck, broken))
    findings.extend(_exclude_findings(ck, formats))
    findings.extend(_declared_format_findings(ck, formats))
    return LintReport(str(directory), ck.config.schema, tuple(_sorted(findings)))


def _mtp_findings(ck: Checkpoint, broken: set) -> list[Finding]:
    """DeepSeek-V4's MTP blocks (mtp.{j}.*; whole-checkpoint lint only): each loaded as the MTP stages read it
    (Checkpoint.load_mtp: every linear's dtypes, shapes and scale bytes checked; a defect is an error finding
    naming the tensor), then one info finding per projection naming its FP8 encoding (fp8_encoding) and one
    per expert stack naming its MXFP4 format (mtp_mxfp4_experts)."""
    if ck.config.schema != "deepseek_v4":
        return []
    from verify.units import mtp_prefixes  # noqa: PLC0415

    out: list[Finding] = []
    for j, prefix in mtp_prefixes(ck):
        names = ck.names_with_prefix(prefix)
        bad = sorted({str(ck.directory / ck.weight_map[n]) for n in names} & broken)
        if bad:
            out.append(Finding("warning", "layer_not_checked", prefix.rstrip("."),
                               f"not checked: {len(bad)} of its files have structural errors (first "
                               f"{Path(bad[0]).name})", file=bad[0]))
            continue
        try:
            mtp = ck.load_mtp(j)
        except CheckpointError as e:
            out.append(_error_finding(e, prefix.rstrip(".")))
            continue
        out.extend(_fp8_encoding_findings(ck, mtp))
        if mtp.experts is not None:
            for lin in (mtp.experts.w1, mtp.experts.w3, mtp.experts.w2):
                e_n, n, half_k = lin.weight_u8.shape
                out.append(Finding("info", "mtp_mxfp4_experts", lin.module,
                                   f"mxfp4: {e_n} experts, E2M1 weight [{n}, {2 * half_k}] packed low nibble first, "
                                   f"E8M0 scale per 32 along K [{n}, {2 * half_k // 32}] (.scale, 2^(b-127); judged "
                                   "W4A8 by the MTP stages)"))
    return out


def _sorted(findings: list[Finding]) -> list[Finding]:
    order = {s: j for j, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (order[f.severity], f.code, f.tensor, f.file or ""))


def render_report(report: LintReport, *, console=None, show_info: bool = False) -> None:
    """A rich table of the findings (info rows only with show_info, else counted)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"lint {report.checkpoint} ({report.schema})")
    for col in ("severity", "code", "file", "tensor", "message"):
        table.add_column(col, overflow="fold")
    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    hidden = 0
    for f in report.findings:
        if f.severity == "info" and not show_info:
            hidden += 1
            continue
        table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.code, Path(f.file).name if f.file else "", f.tensor,
                      f.message)
    console.print(table)
    counts = report.to_json()["counts"]
    console.print(f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} info"
                  + (f" ({hidden} info rows hidden; --show-info)" if hidden else ""))


def add_lint_arguments(parser: argparse.ArgumentParser) -> None:
    from verify.config import env_default

    default = env_default("CHECKPOINT", None)
    parser.add_argument("--checkpoint", required=default is None, default=default,
                        help="Checkpoint directory to lint (env NVFP4V_CHECKPOINT, as pytest reads it). "
                             "Default: %(default)r.")
    parser.add_argument("--json", default=None, help="Also write the findings as JSON here. Default: %(default)r.")
    parser.add_argument("--layers", default=None, help="Layers to lint, e.g. '0,3,5-7'. Default: %(default)r (all).")
    parser.add_argument("--show-info", action="store_true", default=False,
                        help="Show info findings in the table too. Default: %(default)r.")
    parser.add_argument("--weight-recipe", default=DEFAULT_WEIGHT_RECIPE, choices=sorted(RECIPES),
                        help="Recipe the NVFP4 weights were quantized with (re-quantization contract). "
                             "Default: %(default)r.")


def cli_lint(args: argparse.Namespace) -> int:
    """`python -m verify lint --checkpoint DIR [--json PATH]`: exit status 1 on any error finding.
    A bad --layers / --json is a UsageError (LayerRangeError) before any work."""
    from rich.console import Console

    from verify.config import parse_layers

    layers = parse_layers(args.layers) or None
    if args.json:
        check_output_file_argument("--json", args.json)
    console = Console()
    console.print(f"checkpoint: {args.checkpoint}")
    report = lint_checkpoint(args.checkpoint, layers=layers,
                             weight_recipe=getattr(args, "weight_recipe", DEFAULT_WEIGHT_RECIPE))
    render_report(report, console=console, show_info=getattr(args, "show_info", False))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
    return 1 if report.errors else 0


def check_output_file_argument(argument: str, path: str | Path) -> None:
    """UsageError (one line naming the argument) unless `path` can be written as a file: not a
    directory, its parent an existing directory."""
    from verify.errors import UsageError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{argument} {path}: invalid value (a directory; expected a file path)", argument=argument)
    if not p.parent.is_dir():
        what = "is not a directory" if p.parent.exists() else "does not exist"
        raise UsageError(f"{argument} {path}: invalid value (directory {p.parent} {what})", argument=argument)
