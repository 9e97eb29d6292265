"""Files written whole or not at all, and the JSON state files of resumable jobs.

A reader (another process, or a resumed run after a crash) sees either the old
file or the new one, never a part: the bytes go to a temporary name in the same
directory and are renamed over the target. On a local disk the bytes are
fsynced before the rename, so after a power loss the new name cannot point at
a short file. Other file systems (gs://...) go through etils.epath, whose
rename is the store's own.

No jax here: the labelling and caching jobs import it in light processes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping


def _is_remote(path: str) -> bool:
  return '://' in path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """`data` to `path` (a local path or an epath/gs:// one), atomically."""
  path = os.fspath(path)
  # The pid keeps two processes writing the same file apart; a leftover temporary
  # (process killed) matches `<name>.tmp-*`.
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    target = epath.Path(path)
    tmp = target.parent / f'{target.name}.tmp-{os.getpid()}'
    tmp.write_bytes(data)
    tmp.replace(target)
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """`obj` as indented JSON with sorted keys, atomically (see write_bytes)."""
  write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str | os.PathLike) -> Any:
  """The JSON in `path`, or None if there is no such file."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested mappings -> {'a.b.c': leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def differences(written: Mapping[str, Any], wanted: Mapping[str, Any], template: str
                ) -> list[str]:
  """One line per leaf that differs between two nested records, sorted by key.

  `template` is a str.format pattern with fields {key}, {written} and {wanted}
  (the leaves' reprs; '<absent>' for a leaf only one side has).
  """
  a, b = flat(written), flat(wanted)
  return [template.format(key=k, written=repr(a.get(k, '<absent>')),
                          wanted=repr(b.get(k, '<absent>')))
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
