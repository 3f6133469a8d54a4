"""Reports of `python -m verify model`: a versioned JSON document is the source, everything else is
rendered from it.

  document   the per-unit (decoder layer or MTP block) documents, the merged model report, its
             schema version and validation against `model_report.schema.json`, timing projections
  plots      matplotlib figures of a report, as inline SVG
  html       one self-contained HTML file (inline CSS, SVG and JS; no network)
  terminal   the rich summary printed at the end of a sweep and by `python -m verify report`
  tables     the per-layer loss and verdict tables of `python -m verify layer` and the sweep (fit 80 columns)
  cli        `python -m verify report RUN_DIR [--html OUT.html]`

Nothing here imports matplotlib until a plot is drawn.
"""
