"""Glob expansion of user data paths, local or gs:// (etils.epath, never os/glob on user paths).

`expand(patterns)` lists files only, by walking the directories under each pattern's literal
prefix (a listing gives file/directory types without a stat per file, locally and on GCS).
Semantics follow `glob.glob(recursive=True)`: `*`, `?`, `[...]` within one path component,
`**` for any number of directories, and wildcards do not match names starting with '.'.
"""

import fnmatch
import functools
import os

from etils import epath

_MAGIC = frozenset("*?[")


def _is_magic(part: str) -> bool:
  return not _MAGIC.isdisjoint(part)


def _part_matches(name: str, pat: str) -> bool:
  if not _is_magic(pat):
    return name == pat
  if name.startswith(".") and not pat.startswith("."):
    return False  # As glob: wildcards skip hidden names.
  return fnmatch.fnmatchcase(name, pat)


def _matches(parts, pats) -> bool:
  """Whether the relative path `parts` matches the pattern components `pats`."""
  if not pats:
    return not parts
  if pats[0] == "**":
    return _matches(parts, pats[1:]) or (
        bool(parts) and not parts[0].startswith(".") and _matches(parts[1:], pats))
  return bool(parts) and _part_matches(parts[0], pats[0]) and _matches(parts[1:], pats[1:])


def _may_contain(parts, pats) -> bool:
  """Whether a directory at `parts` can hold a file matching `pats` (prunes the walk)."""
  if not parts:
    return True
  if not pats:
    return False
  if pats[0] == "**":
    return _may_contain(parts, pats[1:]) or (
        not parts[0].startswith(".") and _may_contain(parts[1:], pats))
  return _part_matches(parts[0], pats[0]) and _may_contain(parts[1:], pats[1:])


def _walk_matches(base: str, pats: list[str]) -> list[str]:
  top = epath.Path(base or ".")
  out, first = [], None
  for root, dirs, files in top.walk():
    # Walk roots may drop the URL scheme (gs://): take paths relative to the first root.
    root = str(root)
    first = root if first is None else first
    rel = root[len(first):].strip("/") if root.startswith(first) else root
    if first == "." and rel.startswith("./"):
      rel = rel[2:]
    rel_parts = [p for p in rel.split("/") if p]
    dirs[:] = sorted(d for d in dirs if _may_contain(rel_parts + [d], pats))
    for name in files:
      if _matches(rel_parts + [name], pats):
        rel_path = "/".join(rel_parts + [name])
        out.append(f"{base.rstrip('/')}/{rel_path}" if base else rel_path)
  return out


def _expand_one(pattern: str) -> list[str]:
  if pattern.startswith("~"):
    pattern = str(epath.Path(pattern).expanduser())
  parts = pattern.split("/")
  first_magic = next((i for i, p in enumerate(parts) if _is_magic(p)), None)
  if first_magic is None:  # A literal path: one check, not a listing.
    path = epath.Path(pattern)
    return [pattern] if path.exists() and not path.is_dir() else []
  base = "/".join(parts[:first_magic])
  if pattern.startswith("/") and not base:
    base = "/"
  return _walk_matches(base, parts[first_magic:])


@functools.lru_cache(maxsize=16)
def _expand_cached(patterns: tuple[str, ...], cwd: str) -> tuple[str, ...]:
  del cwd  # Part of the cache key: relative patterns.
  if not patterns:
    raise ValueError("no path patterns given")
  paths = set()
  for pattern in patterns:
    matched = _expand_one(pattern)
    if not matched:
      raise ValueError(f"data path pattern {pattern!r} matched no files")
    paths.update(matched)
  return tuple(sorted(paths))


def expand(patterns) -> list[str]:
  """Sorted unique files matched by glob patterns (listed once per process, patterns and
  working directory)."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  return list(_expand_cached(tuple(os.fspath(p) for p in patterns), os.getcwd()))
