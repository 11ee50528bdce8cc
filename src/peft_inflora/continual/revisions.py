"""Per-task Hub revisions: the branch ``task-<k>-<name>`` that holds the state after task ``k`` (1-based) of a
sequence, its name made from the task name as a valid git ref, and the listing of a repository's task branches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional


__all__ = ["TASK_REVISION_PREFIX", "task_revision_name", "task_revision_names", "task_revisions"]

TASK_REVISION_PREFIX = "task-"
# the branch names task_revision_name makes: task-<k>-<name part>, k >= 1 without leading zeros
_TASK_REVISION = re.compile(r"^task-([1-9][0-9]*)-([a-z0-9._-]+)$")
_OUTSIDE_REF_CHARACTERS = re.compile(r"[^a-z0-9._-]+")


def _ref_part(task_name: str) -> str:
    """``task_name`` as a git-ref-safe name part: lowercase, runs of characters outside ``[a-z0-9._-]`` replaced
    by one ``-``, runs of ``-`` and of ``.`` collapsed (git refuses ``..``), ``-`` and ``.`` stripped at both ends,
    a trailing ``.lock`` (refused by git) turned into ``-lock``. May be empty."""
    part = _OUTSIDE_REF_CHARACTERS.sub("-", str(task_name).lower())
    part = re.sub(r"\.{2,}", ".", part).strip("-.")
    if part.endswith(".lock"):
        part = part[: -len(".lock")] + "-lock"
    return re.sub(r"-{2,}", "-", part).strip("-.")


def task_revision_name(task_number: int, task_name: str) -> str:
    """The branch that holds the state after task ``task_number`` (1-based) of a sequence: ``task-<k>-<name>``.

    The name is lowercased; every run of characters outside ``a-z``, ``0-9``, ``.``, ``_``, ``-`` becomes one ``-``;
    ``-`` and ``.`` are stripped at both ends. ``task_revision_name(2, "News B")`` is ``"task-2-news-b"``.

    Raises:
        ValueError: ``task_number`` is not an int >= 1, or nothing is left of the name (e.g. ``"!!!"``, or a name
            written only in non-Latin letters).
    """
    if not isinstance(task_number, int) or isinstance(task_number, bool) or task_number < 1:
        raise ValueError(f"task_number is the task's 1-based position in the sequence, got {task_number!r}.")
    part = _ref_part(task_name)
    if not part:
        raise ValueError(
            f"Task name {task_name!r} gives no usable branch name: per-task Hub revisions are named "
            "task-<k>-<name>, with the name lowercased and only the characters a-z, 0-9, '.', '_' and '-' kept. "
            "Rename the task (ContinualTask(name=...)) so that its name contains some of them."
        )
    return f"{TASK_REVISION_PREFIX}{task_number}-{part}"


def task_revision_names(task_names: Sequence[str]) -> list[str]:
    """The branch names of a whole sequence, numbered from 1 (see :func:`task_revision_name`).

    Raises:
        ValueError: a name gives no usable branch name, or two names give the same name part (e.g. ``"News B"`` and
            ``"news-b"``): the branches would differ only by their number, so the names must be told apart.
    """
    branches = [task_revision_name(k, name) for k, name in enumerate(task_names, start=1)]
    seen: dict[str, str] = {}
    for name, branch in zip(task_names, branches):
        part = branch.split("-", 2)[2]
        if part in seen:
            raise ValueError(
                f"Task names {seen[part]!r} and {name!r} give the same branch name part {part!r} (branches are "
                "named task-<k>-<name>, lowercased, characters outside a-z, 0-9, '.', '_', '-' replaced by '-'): "
                "rename one of the tasks so that their branches can be told apart by name."
            )
        seen[part] = name
    return branches


def task_revisions(repo_id: str, *, token: Optional[str] = None, repo_type: Optional[str] = None) -> dict[int, str]:
    """The per-task revisions of a Hub repository: ``{k: branch}`` for every branch named ``task-<k>-<name>``,
    ordered by ``k`` (the 1-based task number). Other branches (``main``, ...) and tags are left out.

    ``PeftModel.from_pretrained(base, repo_id, revision=task_revisions(repo_id)[2])`` loads the adapter after the
    second task.

    Raises:
        ValueError: two branches carry the same task number (e.g. ``task-2-news_b`` and ``task-2-sentiment``, left by
            two sequences that share their first task): pass the branch you mean to ``revision=`` yourself.
    """
    from huggingface_hub import HfApi

    refs = HfApi(token=token).list_repo_refs(repo_id, repo_type=repo_type)
    found: dict[int, list[str]] = {}
    for branch in refs.branches:
        match = _TASK_REVISION.match(branch.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(branch.name)
    clashes = {k: sorted(names) for k, names in found.items() if len(names) > 1}
    if clashes:
        raise ValueError(
            f"{repo_id} has several branches for the same task number: {clashes}. They come from different "
            "sequences pushed to the same repository; pass the branch you mean to revision= directly."
        )
    return {k: found[k][0] for k in sorted(found)}
