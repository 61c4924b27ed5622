"""Image references: ``REPO:TAG`` or ``REPO@sha256:<64 hex>`` (a tag and a digest together,
``REPO:TAG@sha256:...``, is accepted too; the digest wins)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nomadscale.core.errors import UsageError

_REPO = r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
_HOST = r"(?:[a-zA-Z0-9.-]+(?::\d+)?/)?"
_REF = re.compile(
    rf"(?P<repo>{_HOST}{_REPO})(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?"
)


@dataclass(frozen=True, slots=True)
class ImageRef:
    repo: str
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str:
        """The pinned form: by digest when known, else by tag."""
        if self.digest:
            return f"{self.repo}@{self.digest}"
        return f"{self.repo}:{self.tag}"

    def __str__(self) -> str:
        return self.ref


def parse_image(text: str, *, what: str = "--image") -> ImageRef:
    """Validate an image reference; UsageError naming ``what`` when it is wrong."""
    s = (text or "").strip()
    m = _REF.fullmatch(s)
    if not m or not (m.group("tag") or m.group("digest")):
        raise UsageError(
            f"{what}: {text!r} is not an image reference (use REPO:TAG or REPO@sha256:<64 hex>)"
        )
    return ImageRef(repo=m.group("repo"), tag=m.group("tag"), digest=m.group("digest"))
