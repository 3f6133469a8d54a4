"""Checkpoint loading: Hugging Face style NVFP4 checkpoints of DeepSeek-V4 and DeepSeek-V3/R1.

A checkpoint directory holds `config.json`, the quantization config
(`hf_quant_config.json`, or `quantization_config` inside config.json), and either
`model.safetensors.index.json` with its shards or one `*.safetensors` file.
`Checkpoint.open(dir)` reads only the JSON files; `Checkpoint.load_layer(i)` opens only the
shards that hold layer i, validates headers against the schema, then reads exactly those bytes;
`Checkpoint.load_mtp(j)` reads DeepSeek-V4's MTP block `mtp.{j}.*` (FP8 e_proj / h_proj, MXFP4 experts).
Any defect raises one `CheckpointError` subclass naming the file, the tensor or the config key;
an implausible value emits a `CheckpointWarning` (printed, not fatal).

One module per concern; this package re-exports their public names:
  errors       CheckpointError and its subclasses, CheckpointWarning, open_checkpoint_file
  config       ModelConfig, QuantConfig and their parsers (config.json, hf_quant_config.json)
  schema       LinearSpec, TensorSpec, LayerSchema, layer_schema, per-format tensor specs and checks;
               fp8_scale_encoding (which shipped FP8 scale encoding a linear's tensors are in)
  weights      typed linears (Nvfp4Linear, Fp8BlockLinear: every FP8 encoding, Mxfp4Linear,
               Bf16Linear), GatedMlp, Router, LayerWeights, MtpWeights (an MTP block), iter_linears
  safetensors  TensorInfo, IoStats, SAFETENSORS_DTYPES, the header scan and parser, the raw reader
  loader       Checkpoint (load_layer, load_mtp), LayerPlan
  defects      structure_defects (every file and the index, headers only)
  values       value_defects, scale_defects, plausibility_warnings (tensor values, after a layer
               is loaded)

Source of names, dtypes and shapes: shared/NVFP4_FACTS.md sections 4 and 5.
"""

from verify.checkpoint.config import (
    FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK, SCORING_FUNCS, ModelConfig, QuantConfig, model_config_from_json,
    quant_config_from_dir, quant_configs_from_dir, read_json_object,
)
from verify.checkpoint.defects import INDEX_DEFECT_CODES, STRUCTURE_DEFECT_CODES, structure_defects
from verify.checkpoint.errors import (
    CheckpointError, CheckpointWarning, ConfigMismatchError, ConfigValueError, DtypeMismatchError,
    MalformedConfigError, MalformedShardError, MissingIndexError, MissingTensorError, NanScaleError,
    NotACheckpointError, ScaleEncodingError, ShapeMismatchError, TensorValueError, TruncatedShardError,
    UnreadableFileError, UnsupportedSchemaError, ZeroScaleError, checkpoint_warnings_as_lines,
)
from verify.checkpoint.loader import Checkpoint, LayerPlan
from verify.checkpoint.safetensors import (
    INDEX_FILE, SAFETENSORS_DTYPES, SHARD_DEFECT_CODES, IoStats, ShardDefect, ShardScan, TensorInfo,
    read_safetensors_header, read_tensor_bytes, scan_safetensors_header,
)
from verify.checkpoint.values import (
    PLAUSIBILITY_CODES, VALUE_DEFECT_ERRORS, ValueDefect, plausibility_warnings, scale_defects, value_defects,
)
from verify.checkpoint.schema import (
    LayerSchema, LinearSpec, TensorSpec, check_linear_k, check_tensor, layer_schema, linear_format_of,
    linear_tensor_specs, fp8_scale_encoding,
)
from verify.checkpoint.weights import (
    Bf16Linear, Fp8BlockLinear, GatedMlp, LayerWeights, Linear, Mxfp4Linear, MtpWeights, MTP_PROJECTIONS, Nvfp4Linear,
    Router, iter_linears, make_linear, FP8_SCALE_SUFFIX, fp8_act_scale_fmt,
)

__all__ = [
    # errors
    "CheckpointError", "NotACheckpointError", "UnreadableFileError", "MissingIndexError", "MalformedConfigError",
    "ConfigValueError", "ConfigMismatchError", "TruncatedShardError", "MalformedShardError", "MissingTensorError",
    "DtypeMismatchError", "ShapeMismatchError", "NanScaleError", "ZeroScaleError", "TensorValueError",
    "ScaleEncodingError", "UnsupportedSchemaError", "CheckpointWarning", "checkpoint_warnings_as_lines",
    # config
    "ModelConfig", "QuantConfig", "model_config_from_json", "quant_config_from_dir", "quant_configs_from_dir",
    "read_json_object", "NVFP4_BLOCK", "MXFP4_BLOCK", "FP8_BLOCK", "SCORING_FUNCS",
    # schema
    "LinearSpec", "TensorSpec", "LayerSchema", "layer_schema", "linear_format_of", "linear_tensor_specs",
    "check_linear_k", "check_tensor", "fp8_scale_encoding",
    # weights
    "Nvfp4Linear", "Fp8BlockLinear", "Mxfp4Linear", "Bf16Linear", "Linear", "GatedMlp", "Router", "LayerWeights",
    "MtpWeights", "MTP_PROJECTIONS", "iter_linears", "make_linear", "FP8_SCALE_SUFFIX", "fp8_act_scale_fmt",
    # safetensors
    "SAFETENSORS_DTYPES", "INDEX_FILE", "TensorInfo", "IoStats", "ShardDefect", "ShardScan", "SHARD_DEFECT_CODES",
    "scan_safetensors_header", "read_safetensors_header", "read_tensor_bytes",
    # loader
    "Checkpoint", "LayerPlan",
    # defects
    "structure_defects", "INDEX_DEFECT_CODES", "STRUCTURE_DEFECT_CODES",
    # values
    "scale_defects", "value_defects", "plausibility_warnings", "ValueDefect", "VALUE_DEFECT_ERRORS",
    "PLAUSIBILITY_CODES",
]
