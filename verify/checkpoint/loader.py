"""The checkpoint loader: `Checkpoint` (an opened directory) and `LayerPlan` (a layer
validated from headers).

`Checkpoint.open(dir)` reads only the JSON files, checks every config value (config.py) and
the config against the tensor names (`consistency_errors`: layers past num_hidden_layers,
experts past n_routed_experts, config.json's quantization_config against hf_quant_config.json).
`Checkpoint.load_layer(i)` finds the tensors of layer i in the index, opens only the shards that
hold them, parses those shards' safetensors headers (every structural defect refused),
validates every dtype and shape against the schema of the model (chosen from config.json) and
the quant_algo against the stored formats, and only then reads exactly the bytes of those
tensors (counted in `Checkpoint.io`); then it checks their values (values.value_defects) and
warns about implausible global scales (values.plausibility_warnings, CheckpointWarning).
Any defect raises one `CheckpointError` subclass naming the file, the tensor or the config
key; nothing is returned half-loaded. Every entry point (layer, model, selftest, pytest
-m layerN) goes through here, so each refuses a defective checkpoint with the same line.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from verify.checkpoint.config import ModelConfig, QuantConfig, model_config_from_json, quant_configs_from_dir, read_json_object
from verify.checkpoint.values import ValueDefect, plausibility_warnings, scale_defects, value_defects
from verify.checkpoint.errors import (
    CheckpointError, CheckpointWarning, ConfigMismatchError, DtypeMismatchError, MalformedConfigError,
    MissingIndexError, MissingTensorError, NotACheckpointError, UnreadableFileError, os_error_text,
)
from verify.checkpoint.safetensors import (
    INDEX_FILE, SAFETENSORS_DTYPES, IoStats, TensorInfo, read_safetensors_header, read_tensor_bytes,
)
from verify.checkpoint.schema import (
    LayerSchema, LinearSpec, TensorSpec, check_linear_k, check_tensor, layer_schema, linear_format_of,
    linear_tensor_specs,
)
from verify.checkpoint.weights import (MTP_PROJECTIONS, GatedMlp, LayerWeights, Linear, MtpWeights, Mxfp4Linear, Router,
                                      make_linear)

__all__ = ["Checkpoint", "LayerPlan"]

_SCALE_SUFFIXES = (".weight_scale", ".scale", ".weight_scale_inv", ".input_scale")


class Checkpoint:
    """An opened checkpoint directory. Cheap to open: only JSON files are read.

    Attributes: directory, config (ModelConfig), quant (QuantConfig | None: hf_quant_config.json's,
    else config.json's), quant_in_config_json (config.json's quantization_config, when
    hf_quant_config.json is the one used; else None), weight_map (tensor name -> shard file name),
    io (IoStats of every read since open), warnings (every CheckpointWarning since open).
    """

    def __init__(self, directory: Path, config: ModelConfig, config_raw: Mapping, quant: QuantConfig | None,
                 weight_map: Mapping[str, str], index_path: Path | None,
                 quant_in_config_json: QuantConfig | None = None):
        self.directory = directory
        self.config = config
        self.config_raw = config_raw
        self.quant = quant
        self.quant_in_config_json = quant_in_config_json
        self.weight_map = dict(weight_map)
        self.index_path = index_path
        self.io = IoStats()
        self.warnings: list[CheckpointWarning] = []
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, directory: str | os.PathLike, *, check: bool = True) -> "Checkpoint":
        """Open a checkpoint directory (JSON files only; one shard's header when there is no index).

        check: raise the first of consistency_errors() (lint passes False and reports them all)."""
        d = Path(directory)
        _require_directory(d)
        cfg_path = d / "config.json"
        if not _lexists(cfg_path):
            raise NotACheckpointError("no config.json: not a Hugging Face checkpoint directory", file=d)
        raw = read_json_object(cfg_path, MalformedConfigError)
        config = model_config_from_json(raw, cfg_path)
        hf_quant, cj_quant = quant_configs_from_dir(d, raw)
        quant, other = (hf_quant, cj_quant) if hf_quant is not None else (cj_quant, None)
        index_path = d / INDEX_FILE
        stats = IoStats()
        if _lexists(index_path):
            idx = read_json_object(index_path, MissingIndexError)
            wm = idx.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise MissingIndexError("index has no (or an empty) weight_map", file=index_path)
            bad = next((n for n, shard in wm.items() if not isinstance(shard, str) or not shard), None)
            if bad is not None:
                raise MissingIndexError(f"weight_map maps it to {wm[bad]!r}, not a file name", file=index_path,
                                        tensor=bad)
            ck = cls(d, config, raw, quant, wm, index_path, other)
        else:
            shards = sorted(p for p in _listdir(d) if p.name.endswith(".safetensors"))
            if not shards:
                raise NotACheckpointError("no *.safetensors files and no index", file=d)
            if len(shards) > 1:
                raise MissingIndexError(f"{len(shards)} safetensors shards but no {INDEX_FILE}: cannot tell which "
                                        "shard holds which tensor", file=index_path)
            infos = read_safetensors_header(shards[0], stats)
            ck = cls(d, config, raw, quant, {n: shards[0].name for n in infos}, None, other)
            ck._headers[shards[0].name] = infos
        ck.io.files_opened.extend(stats.files_opened)
        ck.io.header_bytes += stats.header_bytes
        if check:
            problems = ck.consistency_errors()
            if problems:
                raise problems[0]
        return ck

    def describe(self) -> str:
        """One line naming what was opened: directory, schema, layers, quantization, files."""
        shards = len(set(self.weight_map.values()))
        q = f"{self.quant.quant_algo} ({Path(self.quant.path).name})" if self.quant else "no quantization config"
        return (f"checkpoint {self.directory}: {self.config.schema}, {self.config.num_layers} layers, "
                f"{self.config.n_routed_experts} experts, {q}, {len(self.weight_map)} tensors in {shards} "
                f"file{'s' if shards != 1 else ''}")

    # ------------------------------------------------------------------ config vs names

    def consistency_errors(self) -> list[CheckpointError]:
        """The config against the tensor names and the other config file (names only, no header
        read), as errors (not raised), in this order:
          ConfigMismatchError  a decoder layer past num_hidden_layers (+ num_nextn_predict_layers
                               for V3, whose MTP layers continue the decoder numbering); an expert
                               past n_routed_experts; config.json's quantization_config and
                               hf_quant_config.json disagreeing on quant_algo, group_size or (where
                               both list exclusions) which stored module they exclude."""
        out: list[CheckpointError] = []
        cfg = self.config
        cfg_path = self.directory / "config.json"
        v4 = cfg.schema == "deepseek_v4"
        layer_rx = re.compile(r"layers\.(\d+)\." if v4 else r"model\.layers\.(\d+)\.")
        limit = cfg.num_layers if v4 else cfg.num_layers + cfg.num_nextn_predict_layers
        past = sorted(((int(m.group(1)), n) for n in self.weight_map if (m := layer_rx.match(n))
                       and int(m.group(1)) >= limit))
        if past:
            i, name = past[0]
            n_past = len({j for j, _ in past})
            extra = "" if v4 else f" + num_nextn_predict_layers={cfg.num_nextn_predict_layers}"
            out.append(ConfigMismatchError(
                f"num_hidden_layers={cfg.num_layers}{extra}, but the checkpoint holds layer {i} "
                f"({n_past} layer(s) past the config: they would be silently skipped)", file=cfg_path,
                tensor=name, key="num_hidden_layers"))
        expert_rx = re.compile(r"(?:^|\.)(?:ffn|mlp)\.experts\.(\d+)\.")
        beyond = sorted(((int(m.group(1)), n) for n in self.weight_map if (m := expert_rx.search(n))
                         and int(m.group(1)) >= cfg.n_routed_experts), key=lambda t: (t[0], t[1]))
        if beyond:
            e, name = beyond[0]
            out.append(ConfigMismatchError(
                f"n_routed_experts={cfg.n_routed_experts}, but the checkpoint holds expert {e} "
                f"({len({(n.rsplit('.experts.', 1)[0], j) for j, n in beyond})} expert(s) past the config)",
                file=self.directory / self.weight_map[name], tensor=name, key="n_routed_experts"))
        out.extend(self._quant_disagreements())
        return out

    def _quant_disagreements(self) -> list[CheckpointError]:
        a, b = self.quant, self.quant_in_config_json
        if a is None or b is None:
            return []
        out: list[CheckpointError] = []
        both = f"{Path(a.source).name} says {{}}, {Path(b.path).name}'s quantization_config says {{}}"
        if b.quant_algo != "MODELOPT" and a.quant_algo != b.quant_algo:  # "MODELOPT": quant_method without algo
            out.append(ConfigMismatchError("quant_algo disagrees: " + both.format(a.quant_algo, b.quant_algo),
                                           file=a.source, key="quant_algo"))
        if a.group_size != b.group_size:
            out.append(ConfigMismatchError("group_size disagrees: " + both.format(a.group_size, b.group_size),
                                           file=a.source, key="group_size"))
        if not (a.exclude_given and b.exclude_given):  # a block without a list defers to the other file
            return out
        ea, eb = a.excluded_matcher(), b.excluded_matcher()
        # what an exclusion decides: linears (every `.weight` but the norms': attn_norm, q_a_layernorm, enorm ...)
        modules = {n[: -len(".weight")] for n in self.weight_map if n.endswith(".weight")
                   and "norm" not in n.rsplit(".", 2)[-2]}
        quantized = {n.rsplit(".", 1)[0] for n in self.weight_map if n.endswith(_SCALE_SUFFIXES)}
        # the quantized linears first in the message, then the others
        differ = sorted((m for m in modules if ea(m) != eb(m)), key=lambda m: (m not in quantized, m))
        if differ:
            m = differ[0]
            which = (f"{a.exclude_key} of {Path(a.source).name}" if ea(m) else
                     f"{b.exclude_key} of {Path(b.path).name}'s quantization_config")
            out.append(ConfigMismatchError(
                f"the two quantization configs exclude different modules ({len(differ)} stored module(s) differ); "
                f"{m} is excluded only by {which}", file=a.source, tensor=m + ".weight", key=a.exclude_key))
        return out

    # ------------------------------------------------------------------ headers

    def _where(self, name: str) -> Path:
        return self.index_path or (self.directory / next(iter(self.weight_map.values())))

    def headers_for(self, names: Iterable[str]) -> dict[str, TensorInfo]:
        """Header entries of `names`, parsing only the shards that hold them."""
        names = list(names)
        for n in names:
            if n not in self.weight_map:
                raise MissingTensorError("not in the checkpoint's weight_map", file=self._where(n), tensor=n)
        out: dict[str, TensorInfo] = {}
        for n in names:
            shard = self.weight_map[n]
            if shard not in self._headers:
                self._headers[shard] = read_safetensors_header(self.directory / shard, self.io)
            info = self._headers[shard].get(n)
            if info is None:
                raise MissingTensorError(f"the index maps it to {shard}, which does not hold it",
                                         file=self.directory / shard, tensor=n)
            out[n] = info
        return out

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    # ------------------------------------------------------------------ reading

    def read_tensors(self, infos: list[TensorInfo], *, device: torch.device | str = "cpu") -> Tensor:
        """Stack tensors of one dtype and shape: [len(infos), *shape] in their stored dtype."""
        first = infos[0]
        dst = torch.empty((len(infos), first.nbytes), dtype=torch.uint8, device=device)
        read_tensor_bytes(infos, dst, self.io)
        dtype = SAFETENSORS_DTYPES[first.dtype]
        return dst.view(dtype).reshape(len(infos), *first.shape)

    def read_tensor(self, info: TensorInfo, *, device: torch.device | str = "cpu") -> Tensor:
        return self.read_tensors([info], device=device)[0]

    def get_tensor(self, name: str, *, device: torch.device | str = "cpu") -> Tensor:
        """One tensor by name, as stored."""
        return self.read_tensor(self.headers_for([name])[name], device=device)

    # ------------------------------------------------------------------ layer

    def layer_names(self, i: int) -> list[str]:
        """Every tensor name of layer i in the index (`layers.{i}.` after the schema's prefix)."""
        return self.names_with_prefix(layer_schema(self.config, i).prefix + ".")

    def plan_layer(self, i: int) -> "LayerPlan":
        """Validate layer i against the schema using headers only (no tensor data read)."""
        present = self.layer_names(i)
        infos = self.headers_for(present)
        schema = layer_schema(self.config, i).with_present(infos)
        # A layer's linears: every LinearSpec must exist; its format comes from the stored dtypes.
        linears: dict[str, tuple[LinearSpec, str, list[TensorSpec]]] = {}
        for spec in schema.linear_specs():
            if f"{spec.module}.weight" not in infos:
                raise MissingTensorError("required by the schema, not in the weight_map", file=self._where(spec.module),
                                         tensor=f"{spec.module}.weight")
            fmt = linear_format_of(spec.module, infos)
            check_linear_k(spec, fmt, infos[f"{spec.module}.weight"].file)
            linears[spec.module] = (spec, fmt, linear_tensor_specs(fmt, spec.module, spec.n, spec.k, infos))
        plain = list(schema.norms) + list(schema.router)
        for tspec in plain + [t for (_, _, ts) in linears.values() for t in ts]:
            info = infos.get(tspec.name)
            if info is None:
                raise MissingTensorError("required by the schema, not in the weight_map",
                                         file=self._where(tspec.name), tensor=tspec.name)
            check_tensor(info, tspec)
        self._check_quant_algo(linears, infos)
        used = {t.name for t in plain} | {t.name for (_, _, ts) in linears.values() for t in ts}
        extras = [n for n in present if n not in used]
        return LayerPlan(i, schema, infos, linears, plain, extras)

    def _check_quant_algo(self, linears: Mapping[str, tuple[LinearSpec, str, list[TensorSpec]]],
                          infos: Mapping[str, TensorInfo]) -> None:
        """ConfigMismatchError when NVFP4 weights are stored under a quant_algo that is not NVFP4
        (e.g. FP8): a loader that trusts the config reads packed E2M1 bytes as FP8."""
        q = self.quant
        if q is None or "NVFP4" in q.quant_algo or q.quant_algo in ("MIXED_PRECISION", "MODELOPT"):
            return
        nvfp4 = [m for m, (_, fmt, _) in linears.items() if fmt == "nvfp4"]
        if nvfp4:
            w = infos[f"{nvfp4[0]}.weight"]
            raise ConfigMismatchError(
                f"quant_algo {q.quant_algo} in {Path(q.source).name}, but {len(nvfp4)} linear(s) of this layer are "
                f"stored as NVFP4 (U8 weight + F8_E4M3 weight_scale, first in {w.file.name})", file=q.source,
                tensor=w.name, key="quant_algo")

    def load_layer(self, i: int, *, device: torch.device | str = "cpu", check_values: bool = True) -> LayerWeights:
        """Layer i as typed objects. Opens only the shards that hold `layers.{i}.` tensors.

        check_values: raise the first of values.value_defects (NanScaleError, ZeroScaleError,
        TensorValueError, naming the tensor and its file) and warn (CheckpointWarning, also kept in
        self.warnings) for each of values.plausibility_warnings. lint passes False and reports
        both as findings instead.
        """
        plan = self.plan_layer(i)
        schema = plan.schema
        experts = None
        if schema.experts:
            experts = self._load_stack([t for t in schema.experts], plan, device)
        shared = self._load_stack([schema.shared], plan, device, stacked=False) if schema.shared else None
        dense = self._load_stack([schema.dense], plan, device, stacked=False) if schema.dense else None
        attention = {s.role: self._load_linear([s.module], plan, device, stacked=False) for s in schema.attention}
        norms: dict[str, Tensor] = {}
        router_t: dict[str, Tensor] = {}
        for tspec in plan.plain:
            t = self.read_tensor(plan.infos[tspec.name], device=device)
            (norms if tspec in schema.norms else router_t)[tspec.role] = t
        router = None
        if "gate_weight" in router_t:
            tid = router_t.get("tid2eid")
            router = Router(router_t["gate_weight"], router_t.get("gate_bias"),
                            tid.to(torch.int64) if tid is not None else None)
        extras = {n[len(schema.prefix) + 1:]: self.read_tensor(plan.infos[n], device=device) for n in plan.extras}
        layer = LayerWeights(i, self.config.schema, attention, norms, router, experts, shared, dense, extras)
        if check_values:
            bad = value_defects(layer, self.config, schema.prefix)
            if bad:
                raise self._value_error(bad[0], plan.infos)
            for w in plausibility_warnings(layer):
                self.warn(w, plan.infos)
        return layer

    def _file_of(self, tensor: str, infos: Mapping[str, TensorInfo]) -> Path | None:
        info = infos.get(tensor)
        if info is not None:
            return info.file
        shard = self.weight_map.get(tensor)
        return self.directory / shard if shard else None

    def _value_error(self, d: ValueDefect, infos: Mapping[str, TensorInfo]) -> CheckpointError:
        key = "n_routed_experts" if d.code == "expert_id_out_of_range" else None
        return d.error(d.message, file=self._file_of(d.tensor, infos), tensor=d.tensor, key=key)

    def warn(self, d: ValueDefect, infos: Mapping[str, TensorInfo] | None = None) -> CheckpointWarning:
        """Record and emit (warnings.warn) one plausibility warning; returns it."""
        w = CheckpointWarning(d.message, code=d.code, file=self._file_of(d.tensor, infos or {}), tensor=d.tensor,
                              value=d.value)
        self.warnings.append(w)
        warnings.warn(w, stacklevel=3)
        return w

    def _load_stack(self, trios: list[tuple[LinearSpec, LinearSpec, LinearSpec]], plan: "LayerPlan",
                    device, stacked: bool = True) -> GatedMlp:
        mods = [[t[j].module for t in trios] for j in range(3)]
        return GatedMlp(*(self._load_linear(m, plan, device, stacked) for m in mods))

    def _load_linear(self, modules: list[str], plan: "LayerPlan", device, stacked: bool) -> Linear:
        fmts = {plan.linears[m][1] for m in modules}
        if len(fmts) != 1:
            raise DtypeMismatchError(f"an expert stack mixes formats {sorted(fmts)}", tensor=modules[0] + ".weight")
        fmt = fmts.pop()
        role_to_t: dict[str, Tensor] = {}
        for j, tspec in enumerate(plan.linears[modules[0]][2]):
            infos = [plan.infos[plan.linears[m][2][j].name] for m in modules]
            t = self.read_tensors(infos, device=device)
            role_to_t[tspec.role] = t if stacked else t[0]
        name = modules[0] if not stacked else modules[0].replace(".experts.0.", ".experts.*.")
        return make_linear(fmt, name, role_to_t)

    # ------------------------------------------------------------------ mtp

    def load_prefix_linears(self, prefix: str, *, device: torch.device | str = "cpu") -> dict[str, Linear]:
        """Every linear under `prefix` (e.g. "mtp.0."), format detected from dtypes, shapes as stored
        (no schema): this is how `mtp.*` MXFP4 experts are read. A 1-D `.weight` is a norm, not a linear."""
        names = self.names_with_prefix(prefix)
        infos = self.headers_for(names)
        out: dict[str, Linear] = {}
        for n in names:
            if not n.endswith(".weight"):
                continue
            module = n[: -len(".weight")]
            w = infos[n]
            if len(w.shape) < 2:
                continue
            fmt = linear_format_of(module, infos)
            n_rows, cols = w.shape[-2], w.shape[-1]
            k = cols * 2 if fmt in ("nvfp4", "mxfp4") else cols
            specs = linear_tensor_specs(fmt, module, n_rows, k, infos)
            for s in specs:
                if s.name not in infos:
                    raise MissingTensorError("required for its format", file=w.file, tensor=s.name)
                check_tensor(infos[s.name], s)
            out[module] = make_linear(fmt, module, {s.role: self.read_tensor(infos[s.name], device=device)
                                                    for s in specs})
            bad = scale_defects(out[module])
            if bad:
                raise self._value_error(bad[0], infos)
        return out

    def load_mtp(self, j: int, *, device: torch.device | str = "cpu") -> MtpWeights:
        """DeepSeek-V4's MTP block j (`mtp.{j}.*`) as typed objects: e_proj / h_proj (required), the stored norms
        (enorm, hnorm, norm, attn_norm, ffn_norm), the routed experts `ffn.experts.{e}.w1|w3|w2` stacked with a
        leading [E] (experts 0..E-1 all present, one format), every other linear and tensor as stored. Every
        linear's dtypes, shapes and scale bytes are checked (load_prefix_linears); a missing projection is a
        MissingTensorError, experts with gaps or mixed formats a DtypeMismatchError / MissingTensorError."""
        if self.config.schema != "deepseek_v4":
            raise ValueError(f"load_mtp: schema {self.config.schema!r}: V3's MTP layer continues the decoder "
                             "numbering (model.layers.{num_hidden_layers}); only DeepSeek-V4's mtp.{j} is an MTP block")
        prefix = f"mtp.{j}."
        linears = self.load_prefix_linears(prefix, device=device)
        where = self.index_path or self.directory
        projections = {}
        for role in MTP_PROJECTIONS:
            lin = linears.pop(f"{prefix}{role}", None)
            if lin is None:
                raise MissingTensorError("the MTP block's projection is not in the weight_map", file=where,
                                         tensor=f"{prefix}{role}.weight")
            projections[role] = lin
        expert_rx = re.compile(re.escape(prefix) + r"ffn\.experts\.(\d+)\.(w1|w2|w3)$")
        found: dict[int, dict[str, Linear]] = {}
        for module in [m for m in linears if expert_rx.match(m)]:
            m = expert_rx.match(module)
            found.setdefault(int(m.group(1)), {})[m.group(2)] = linears.pop(module)
        experts = _stack_experts(found, f"{prefix}ffn.experts", where) if found else None
        names = self.names_with_prefix(prefix)
        modules = [lin.module for lin in (*projections.values(), *linears.values())]
        used = {n for m in modules for n in names if n.startswith(m + ".")}
        used |= {n for n in names if expert_rx.match(n.rsplit(".", 1)[0])}
        rest = {n[len(prefix):]: self.get_tensor(n, device=device) for n in names if n not in used}
        norms = {k[: -len(".weight")]: rest.pop(k) for k in list(rest)
                 if k in ("enorm.weight", "hnorm.weight", "norm.weight", "attn_norm.weight", "ffn_norm.weight")}
        return MtpWeights(j, self.config.schema, prefix, projections, norms, experts, linears, rest)


def _stack_experts(found: Mapping[int, Mapping[str, Linear]], base: str, where: Path) -> GatedMlp:
    """The experts 0..E-1 of one MTP block as GatedMlp stacks (a leading [E] on every tensor)."""
    n = max(found) + 1
    for e in range(n):
        for w in ("w1", "w3", "w2"):
            if w not in found.get(e, {}):
                raise MissingTensorError(f"experts 0..{n - 1} are stored but this one is not", file=where,
                                         tensor=f"{base}.{e}.{w}.weight")

    def stack(w: str) -> Linear:
        lins = [found[e][w] for e in range(n)]
        types = {type(lin) for lin in lins}
        if types != {Mxfp4Linear}:
            raise DtypeMismatchError(f"the MTP experts must all be MXFP4 (I8/U8 weight + F8_E8M0 scale per 32); "
                                     f"found {sorted(t.__name__ for t in types)}", tensor=f"{base}.0.{w}.weight")
        shapes = {(tuple(lin.weight_u8.shape), tuple(lin.scale_ue8m0.shape)) for lin in lins}
        if len(shapes) != 1:
            raise DtypeMismatchError(f"the MTP experts' {w} differ in shape: {sorted(shapes)}",
                                     tensor=f"{base}.0.{w}.weight")
        return Mxfp4Linear(f"{base}.*.{w}", torch.stack([lin.weight_u8 for lin in lins]),
                           torch.stack([lin.scale_ue8m0.view(torch.uint8) for lin in lins]).view(torch.float8_e8m0fnu))

    return GatedMlp(stack("w1"), stack("w3"), stack("w2"))


@dataclass(frozen=True)
class LayerPlan:
    """Layer i validated from headers: infos per tensor, per linear (spec, format, tensor specs),
    the plain tensors and the names the schema does not know (extras)."""

    index: int
    schema: LayerSchema
    infos: Mapping[str, TensorInfo]
    linears: Mapping[str, tuple[LinearSpec, str, list[TensorSpec]]]
    plain: list[TensorSpec]
    extras: list[str]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


# ============================================================================= paths


def _os_error(path: Path, e: OSError, what: str) -> CheckpointError:
    if isinstance(e, FileNotFoundError):
        return NotACheckpointError(f"{what}: no such file or directory", file=path)
    return UnreadableFileError(f"{what}: {os_error_text(e)}", file=path)


def _require_directory(d: Path) -> None:
    """NotACheckpointError unless `d` is a directory; UnreadableFileError for a symlink loop or a
    directory that cannot be searched."""
    try:
        st = os.stat(d)
    except OSError as e:
        raise _os_error(d, e, "cannot open the checkpoint directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotACheckpointError("not a directory", file=d)


def _lexists(path: Path) -> bool:
    """Whether a directory entry exists (a symlink counts, even a looping one: reading it then says
    why); UnreadableFileError when the directory cannot be searched."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _os_error(path, e, "cannot look for the file") from None
    return True


def _listdir(d: Path) -> list[Path]:
    try:
        return [d / n for n in os.listdir(d)]
    except OSError as e:
        raise _os_error(d, e, "cannot list the checkpoint directory") from None
