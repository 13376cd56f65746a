"""Organisational policy: model tiers per project or key, and the per-project response cache.

Read from the budgets/config file (YAML or TOML, SPENDSTREAM_POLICY_FILE), next to its `budgets:`:

```yaml
tiers:                        # name -> fnmatch patterns of the models the tier allows
  basic: ["gpt-4o-mini*", "claude-3-5-haiku*", "gemini-2.0-flash*"]
  premium: ["*"]
projects:                     # per project: its tier, and a response cache TTL in seconds
  checkout: {tier: basic, cache_ttl: 300}
```

A call may use a model only if the key's own `models` patterns allow it (when it has any) AND the
key's tier, else its project's tier, allows it (a key or project without a tier: any model). A
tier name that the file does not define refuses every model (fail closed), and `Policy.load`
refuses a file whose projects name one.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from spendstream.api_keys import (
    MAX_CACHE_TTL_S,
    MAX_MODEL_GLOB_CHARS,
    MAX_MODEL_GLOBS,
    MAX_RPM,
    MAX_TPM,
    ApiKey,
    check_attribution,
    check_tier_name,
)
from spendstream.errors import ConfigError

__all__ = ["MAX_TIERS", "Policy", "TierRefusal"]

MAX_TIERS = 256
_PROJECT_KEYS = {"tier", "cache_ttl", "rpm", "tpm"}


@dataclass(frozen=True)
class TierRefusal:
    """Why a key may not use a model: the tier that decided (None: the key's own patterns), the
    patterns that would have been allowed, and a message naming both."""

    tier: str | None
    allowed: tuple[str, ...]
    message: str


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _allows(patterns: Iterable[str], model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


@dataclass(frozen=True)
class Policy:
    tiers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({}))
    project_tiers: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    project_cache_ttl: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    # project -> (requests, tokens) per minute for all its keys together, fleet-wide (None: no limit)
    project_limits: Mapping[str, tuple[int | None, int | None]] = field(default_factory=lambda: _frozen({}))

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        """The policy of a YAML or TOML file (None: the empty policy, which allows every model).
        ConfigError naming the file, the entry and what is allowed when a value is wrong."""
        if path is None:
            return cls()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"policy file {path} is not valid: {exc}") from None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping with tiers: and projects: (and budgets:)")
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "policy") -> Policy:
        """The policy of a parsed file's `tiers` and `projects` sections (other sections ignored)."""
        raw_tiers = data.get("tiers") or {}
        raw_projects = data.get("projects") or {}
        if not isinstance(raw_tiers, dict):
            raise ConfigError(
                f'{source}: tiers must map a tier name to model patterns, e.g. basic: ["gpt-4o-mini*"]'
            )
        if not isinstance(raw_projects, dict):
            raise ConfigError(
                f"{source}: projects must map a project to {{tier: NAME, cache_ttl: SECONDS, rpm: N, tpm: N}}"
            )
        if len(raw_tiers) > MAX_TIERS:
            raise ConfigError(f"{source}: {len(raw_tiers)} tiers: at most {MAX_TIERS}")
        tiers: dict[str, tuple[str, ...]] = {}
        for name, patterns in raw_tiers.items():
            where = f"{source}: tier {str(name)[:40]!r}"
            try:
                check_tier_name(name)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            if (
                not isinstance(patterns, list)
                or not 0 < len(patterns) <= MAX_MODEL_GLOBS
                or any(type(p) is not str or not 0 < len(p) <= MAX_MODEL_GLOB_CHARS for p in patterns)
            ):
                raise ConfigError(
                    f'{where}: a list of 1 to {MAX_MODEL_GLOBS} model patterns such as ["gpt-4o-mini*"] '
                    f"(each at most {MAX_MODEL_GLOB_CHARS} characters)"
                )
            tiers[name] = tuple(patterns)
        project_tiers: dict[str, str] = {}
        cache_ttl: dict[str, int] = {}
        project_limits: dict[str, tuple[int | None, int | None]] = {}
        for project, entry in raw_projects.items():
            where = f"{source}: project {str(project)[:40]!r}"
            try:
                check_attribution(project)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if not isinstance(entry, dict) or not entry or set(entry) - _PROJECT_KEYS:
                raise ConfigError(
                    f"{where}: expected any of {{tier: NAME, cache_ttl: SECONDS, rpm: N, tpm: N}}"
                )
            if "tier" in entry:
                tier = entry["tier"]
                if tier not in tiers:
                    raise ConfigError(
                        f"{where}: tier {str(tier)[:40]!r} is not defined under tiers: "
                        f"(defined: {', '.join(sorted(tiers)) or 'none'})"
                    )
                project_tiers[project] = tier
            if "cache_ttl" in entry:
                ttl = entry["cache_ttl"]
                if type(ttl) is not int or not 1 <= ttl <= MAX_CACHE_TTL_S:
                    raise ConfigError(
                        f"{where}: cache_ttl is whole seconds from 1 to {MAX_CACHE_TTL_S:,}, got {ttl!r}"
                    )
                cache_ttl[project] = ttl
            limits = []
            for name, top in (("rpm", MAX_RPM), ("tpm", MAX_TPM)):
                value = entry.get(name)
                if value is not None and (type(value) is not int or not 1 <= value <= top):
                    raise ConfigError(f"{where}: {name} is a whole number from 1 to {top:,}, got {value!r}")
                limits.append(value)
            if limits != [None, None]:
                project_limits[project] = (limits[0], limits[1])
        return cls(_frozen(tiers), _frozen(project_tiers), _frozen(cache_ttl), _frozen(project_limits))

    def tier_of(self, key: ApiKey) -> str | None:
        """The tier that applies to `key`: its own, else its project's, else None (no tier)."""
        return key.tier if key.tier is not None else self.project_tiers.get(key.project)

    def refusal(self, key: ApiKey, model: str) -> TierRefusal | None:
        """Why `key` may not use `model` (None: it may). The message names the tier and the allowed
        models, and is meant for the caller (an HTTP 403)."""
        if key.models and not _allows(key.models, model):
            return TierRefusal(
                self.tier_of(key),
                key.models,
                f"model {model!r} is not allowed for key {key.id}: it may use {', '.join(key.models)}",
            )
        tier = self.tier_of(key)
        if tier is None:
            return None
        allowed = self.tiers.get(tier)
        if allowed is None:
            return TierRefusal(
                tier,
                (),
                f"key {key.id} is on tier {tier!r}, which the gateway's policy file does not define: "
                "no model is allowed until an administrator adds it under tiers:",
            )
        if _allows(allowed, model):
            return None
        whose = "key" if key.tier is not None else f"project {key.project}"
        return TierRefusal(
            tier,
            allowed,
            f"model {model!r} is outside the {whose}'s tier {tier!r}, which allows: {', '.join(allowed)}",
        )

    def allows(self, key: ApiKey, model: str) -> bool:
        return self.refusal(key, model) is None

    def allowed_models(self, key: ApiKey, models: Iterable[str]) -> list[str]:
        """Those of `models` (e.g. the price catalogue's) that `key` may use, in order: /v1/models."""
        return [m for m in models if self.refusal(key, m) is None]

    def cache_ttl(self, key: ApiKey) -> int | None:
        """Seconds to cache responses of calls with `key`: the key's, else its project's, else None."""
        return key.cache_ttl_s if key.cache_ttl_s is not None else self.project_cache_ttl.get(key.project)
