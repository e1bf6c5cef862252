"""What a user types to name a model on the Hub: ``owner/repo[:branch]`` or a Hub URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
_BRANCH = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")


class RepoSpecError(ValueError):
    """Text that does not name a Hub model repository."""


@dataclass(frozen=True)
class RepoSpec:
    owner: str
    repo: str
    branch: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def revision(self) -> str:
        return self.branch or "main"

    def folder_name(self) -> str:
        """``owner_repo`` plus ``_branch`` when the branch is not main."""
        name = f"{self.owner}_{self.repo}"
        if self.branch and self.branch != "main":
            name += "_" + self.branch.replace("/", "_")
        return name

    def __str__(self) -> str:
        return self.repo_id + (f":{self.branch}" if self.branch else "")


def _check_name(part: str, what: str, text: str) -> str:
    if not part:
        raise RepoSpecError(f"'{text}': the {what} is empty; expected owner/repo or owner/repo:branch")
    if ".." in part or "--" in part or not _NAME.match(part):
        raise RepoSpecError(
            f"'{text}': '{part}' is not a valid {what} (letters, digits, '-', '_' and '.', "
            "not starting or ending with '.', at most 96 characters)"
        )
    return part


def _check_branch(branch: str, text: str) -> str:
    if (
        not branch
        or ".." in branch
        or branch.endswith((".lock", "/", "."))
        or branch.startswith(("/", "-", "."))
        or not _BRANCH.match(branch)
    ):
        raise RepoSpecError(f"'{text}': '{branch}' is not a valid branch name")
    return branch


def _from_url(text: str) -> tuple[str, str | None]:
    url = urlparse(text)
    if url.scheme not in ("http", "https") or url.hostname not in HUB_HOSTS:
        raise RepoSpecError(f"'{text}': only huggingface.co model URLs are understood")
    parts = [unquote(p) for p in url.path.split("/") if p]
    if len(parts) < 2:
        raise RepoSpecError(f"'{text}': the URL names no owner/repo")
    branch = None
    if len(parts) >= 4 and parts[2] in ("tree", "blob", "resolve"):
        branch = "/".join(parts[3:]) if parts[2] == "tree" else parts[3]
    elif len(parts) > 2:
        raise RepoSpecError(f"'{text}': not a model page URL")
    return f"{parts[0]}/{parts[1]}", branch


def parse_repo_spec(text: str) -> RepoSpec:
    raw = (text or "").strip()
    if not raw:
        raise RepoSpecError("enter a model as owner/repo or owner/repo:branch")
    if any(c.isspace() for c in raw):
        raise RepoSpecError(f"'{raw}': spaces are not allowed in a model name")
    if raw.startswith(("http://", "https://")):
        repo_id, branch = _from_url(raw)
    else:
        repo_id, _, branch_text = raw.partition(":")
        branch = branch_text if ":" in raw else None
        if branch == "":
            raise RepoSpecError(f"'{raw}': the branch after ':' is empty")
    pieces = repo_id.split("/")
    if len(pieces) != 2:
        raise RepoSpecError(f"'{raw}': expected exactly one '/' between owner and repo")
    owner = _check_name(pieces[0], "owner", raw)
    repo = _check_name(pieces[1], "repository name", raw)
    return RepoSpec(owner, repo, _check_branch(branch, raw) if branch is not None else None)
