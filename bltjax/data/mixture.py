"""The document sources of a data section: one (data.source/paths/text_field) or a weighted
mixture (data.mixture), validated with errors that name the offending field.

    data.mixture = (
        dict(name="web", source="parquet", paths=("gs://b/web/*.parquet",), weight=0.7,
             text_field="text"),
        dict(name="code", source="jsonl", paths=("/data/code/*.jsonl",), weight=0.3,
             text_field="content"),
    )

Weights are shares of training bytes: the pipeline mixes packed rows of data.seq_len bytes.
`text_field` is required for jsonl/parquet components and may be left out for the others.
"""

import math
import numbers
import re
import typing
from collections.abc import Mapping

from bltjax.data import sources

Component = typing.NamedTuple("Component", [
    ("name", str), ("source", str), ("paths", tuple), ("weight", float), ("text_field", str)])

_FIELDS = ("name", "source", "paths", "weight", "text_field")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # Names end up in metric names: eval_bpb/<name>.


def _component(i: int, entry) -> Component:
  where = f"data.mixture[{i}]"
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where} must be a dict with fields {_FIELDS}, got {entry!r}")
  unknown = sorted(set(entry) - set(_FIELDS))
  if unknown:
    raise ValueError(f"{where} has unknown field(s) {unknown}; valid fields: {_FIELDS}")
  for field in ("name", "source", "paths", "weight"):
    if field not in entry:
      raise ValueError(f"{where}.{field} is missing")
  name, kind, weight = entry["name"], entry["source"], entry["weight"]
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f"{where}.name={name!r} must be a non-empty string of letters, digits, "
                     "'_', '.' or '-' (it names the eval_bpb/<name> metric)")
  if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (
      math.isfinite(weight) and weight > 0):
    raise ValueError(f"{where}.weight={weight!r} must be a finite number > 0")
  if kind in sources.STREAMED and "text_field" not in entry:
    raise ValueError(f"{where}.text_field is missing (required for source {kind!r})")
  text_field = entry.get("text_field", "text")
  paths = sources.check_source(kind, entry["paths"], text_field, where)
  return Component(name, kind, tuple(paths), float(weight), text_field)


def components(data_cfg) -> list[Component]:
  """The sources a data section reads, in config order (one unless data.mixture is set)."""
  d = data_cfg
  if not d.mixture:
    paths = sources.check_source(d.source, d.paths or (), d.text_field)
    return [Component(d.source, d.source, tuple(paths), 1.0, d.text_field)]
  if d.paths:
    raise ValueError(f"data.mixture is set, so data.paths must be () (each component names its "
                     f"paths), got {tuple(d.paths)}")
  out = [_component(i, entry) for i, entry in enumerate(d.mixture)]
  seen = set()
  for i, c in enumerate(out):
    if c.name in seen:
      raise ValueError(f"data.mixture[{i}].name={c.name!r} is a duplicate")
    seen.add(c.name)
  return out


def source_names(data_cfg) -> list[str]:
  """The names of the sources, in config order: the mixture's component names, or [data.source]
  for a single source."""
  return [c.name for c in components(data_cfg)]


def select(data_cfg, source: str | None) -> list[Component]:
  """All components, or the one named `source`."""
  comps = components(data_cfg)
  if source is None:
    return comps
  names = [c.name for c in comps]
  if source not in names:
    raise ValueError(f"data source {source!r} is not a data.mixture component; names: {names}")
  return [c for c in comps if c.name == source]
