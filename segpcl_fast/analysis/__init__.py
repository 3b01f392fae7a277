"""The paper's analyses as functions (each also a `segpcl-fast` subcommand). Each runs on the
offline world by default, writes <output_dir>/<name>.json, <name>.txt (the printed table) and
<name>.png atomically, and returns {"rows", "paths", "table", ...}.

    fragility()         boundary vs core JSD of old-class images across a task; anchors vs random images
    retention()         zero-shot accuracy outside the sequence, before vs after, per variant
    sweep(axes=[...])   any config keys, grid x seeds, one table + plot
    distill_sources()   ACGD on anchors / new_data / seeds / a reference folder
    anchor_views()      2-D projection of prototypes, seeds, anchors, new images
"""
from .anchor_views import anchor_views, project_2d
from .distill_sources import distill_sources
from .fragility import boundary_scores, fragility, jensen_shannon, split_boundary_core
from .retention import retention, zeroshot_accuracy
from .sweep import expand_grid, parse_axes, split_values, sweep

__all__ = ["anchor_views", "project_2d", "distill_sources", "fragility", "boundary_scores", "jensen_shannon",
           "split_boundary_core", "retention", "zeroshot_accuracy", "expand_grid", "parse_axes", "split_values",
           "sweep"]
