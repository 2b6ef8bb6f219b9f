"""What ``merit diagnose`` reads from a run folder, checked before any work, and lazy checkpoint access.

Every refusal is a :class:`merit.errors.MeritError` naming the file and what to do (the CLI prints it in
one line, exit code 2), raised before anything is computed or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merit.errors import MeritError

MERGE_OPERATOR = "token-weighted"


def log(msg: str) -> None:
    import sys

    print(f"[merit] diagnose: {msg}", file=sys.stderr, flush=True)


class Memo:
    """The numbers a diagnosis has computed so far (each loss, each curvature), by label, written to
    ``path`` after every one, so a diagnosis that is stopped (a session's end, a preempted node: the whole
    thing is ~300 evaluations at the paper's settings) resumes where it stopped instead of from zero.

    The file carries the diagnose stage's key: values from other checkpoints or settings are never reused.
    JSON keeps Python floats exactly (shortest repr), so a resumed diagnosis writes the same numbers as an
    uninterrupted one. ``path=None``: remember nothing (the ``merit diagnose`` command).
    """

    def __init__(self, path: Path | None = None, key: str | None = None):
        import json

        self.path, self.key, self.values, self.reused = path, key, {}, 0
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("key") == key:
                self.values = dict(data.get("values", {}))
        self.resumed = len(self.values)

    def __call__(self, label: str, compute):
        if label in self.values:
            self.reused += 1
            return self.values[label]
        value = compute()
        self.values[label] = value
        if self.path is not None:
            from merit import artifacts

            artifacts.write_json(self.path, {"key": self.key, "values": self.values})
        return value

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class Merge:
    """One split's branches and their token-weighted merge."""

    name: str  # results.json row, e.g. "merit-r1" or "random-k2"
    branches: list[Path]  # the merged ones (a partial merge leaves some out)
    indices: list[int]  # their group numbers in plan.json
    weights: list[float]  # as the merge used them (renormalised when partial)
    merged: Path


@dataclass
class RunFolder:
    root: Path
    cfg: object  # merit.config.RunConfig
    mixture: dict  # mixture manifest with data paths resolved
    theta0: Path
    main: Merge
    random: Merge | None
    joint: Path | None
    results: dict | None


def config_and_mixture(root: Path):
    """The run's config and mixture manifest (data paths resolved from here), or a one-line refusal."""
    from merit import artifacts
    from merit.config import load_config

    if not root.is_dir():
        raise MeritError(f"{root}: no such run folder")
    if not (root / "config.yaml").is_file():
        raise MeritError(f"{root}: not a merit run folder (no config.yaml); give the folder `merit run` wrote")
    cfg = load_config(root / "config.yaml")
    mixture = artifacts.read_manifest(root / "mixture")
    if mixture is None:
        raise MeritError(f"{root}/mixture: no finished mixture stage (no manifest.json); run the pipeline first")
    for entry in mixture["sources"]:
        for side in ("train", "eval"):
            if entry.get(side):
                entry[side] = str(locate(entry[side], root))
    return cfg, mixture


def inspect_run(root: Path) -> RunFolder:
    """Everything diagnose reads, checked before any work; a MeritError naming the file otherwise."""
    from merit import artifacts

    cfg, mixture = config_and_mixture(root)
    main = _merge_of(root, root, _main_name(cfg))
    theta0_manifest = artifacts.read_manifest(root / "theta0")
    theta0_hash = (theta0_manifest or {}).get("hash")
    _check_same_theta0(main, theta0_hash)
    theta0 = _theta0_folder(root, theta0_manifest, main)
    from merit.models.vlm import is_vlm

    if is_vlm(main.merged):  # its eval scores prompts with images (merit.evaluate.vision): not this loss
        raise MeritError(f"{main.merged}: a vision-language checkpoint; merit diagnose measures text-only runs "
                         "for now (its loss would not be results.json's)")
    random = None
    # The random split at the main split's K first (the comparison at equal K), then any other.
    same_k = root / "baselines" / f"random-k{len(main.branches)}"
    for base in sorted((root / "baselines").glob("random-k*"), key=lambda b: (b != same_k, b.name)):
        try:
            random = _merge_of(root, base, base.name)
        except MeritError as e:  # an unfinished baseline is left out, and said so
            log(f"random-split baseline left out: {e}")
            continue
        _check_same_theta0(random, theta0_hash or _branch_hashes(main)[0][1])
        break
    joint_manifest = artifacts.read_manifest(root / "joint")
    joint = root / "joint" if joint_manifest is not None else None
    reference = theta0_hash or _branch_hashes(main)[0][1]
    if joint_manifest is not None and joint_manifest.get("theta0_hash", reference) != reference:
        raise MeritError(f"{root}/joint/manifest.json: trained from θ(0) {str(joint_manifest['theta0_hash'])[:12]}…, "
                         f"not the branches' {str(reference)[:12]}…; joint and the branches must share θ(0)")
    results = artifacts.read_json(root / "results.json") if (root / "results.json").is_file() else None
    return RunFolder(root, cfg, mixture, theta0, main, random, joint, results)


def _main_name(cfg) -> str:
    """The results.json row of the main split's token-weighted merge (as pipeline.stage_split names it)."""
    from merit.pipeline import main_row

    return main_row(cfg)


def _merge_of(root: Path, base: Path, name: str) -> Merge:
    from merit import artifacts
    from merit.merge.lora import is_adapter

    where = base.relative_to(root.parent) if base.is_relative_to(root.parent) else base
    plan_file = base / "split" / "plan.json"
    if not plan_file.is_file():
        raise MeritError(f"{where}: no split/plan.json; run `merit run` at least to --until merge first")
    plan = artifacts.read_json(plan_file)
    merged = base / "merged" / MERGE_OPERATOR
    manifest = artifacts.read_manifest(merged)
    if manifest is None:
        raise MeritError(f"{where}/merged/{MERGE_OPERATOR}: no finished token-weighted merge (no manifest.json); "
                         "run `merit run` to --until merge first")
    missing = set(manifest.get("missing") or [])
    indices = [k for k in range(len(plan["groups"])) if k not in missing]
    branches = [base / "branches" / str(k) for k in indices]
    for b in branches:
        if artifacts.read_manifest(b) is None:
            raise MeritError(f"{where}/branches/{b.name}: no finished branch (no manifest.json); "
                             "train it (`merit run` resumes) before diagnosing")
        if is_adapter(b):
            raise MeritError(f"{where}/branches/{b.name}: a LoRA adapter; merit diagnose needs dense branch checkpoints")
    if len(branches) < 2:
        raise MeritError(f"{where}: the merge has {len(branches)} branch; diagnosing a merge needs at least 2")
    weights = [float(w) for w in manifest.get("weights") or [plan["weights"][k] for k in indices]]
    return Merge(name, branches, indices, weights, merged)


def _branch_hashes(merge: Merge) -> list[tuple[Path, str | None]]:
    from merit import artifacts

    return [(b, artifacts.read_manifest(b).get("theta0_hash")) for b in merge.branches]


def _check_same_theta0(merge: Merge, theta0_hash: str | None) -> None:
    """Branches of one merge must start from the same θ(0) (and from this run's, when it is recorded):
    otherwise displacements and the gain's Taylor expansion compare unrelated points."""
    hashes = _branch_hashes(merge)
    reference = theta0_hash or hashes[0][1]
    for folder, h in hashes:
        if h != reference:
            what = "this run's θ(0)" if theta0_hash else f"{hashes[0][0].name}'s"
            raise MeritError(f"{folder}/manifest.json: trained from θ(0) {str(h)[:12]}…, not {what} "
                             f"{str(reference)[:12]}…; the branches of a merge must share θ(0)")


def _theta0_folder(root: Path, manifest: dict | None, main: Merge) -> Path:
    from merit import artifacts

    candidates = []
    if manifest is not None:
        candidates.append(locate(manifest.get("path", root / "theta0"), root))
    candidates.append(Path(artifacts.read_manifest(main.branches[0]).get("theta0", root / "theta0")))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise MeritError(f"{root}/theta0: θ(0) not found (looked in {', '.join(map(str, candidates))})")


def locate(recorded: str | Path, root: Path) -> Path:
    """A path a manifest recorded, relative to where `merit run` ran: as it is when it exists from here,
    else its tail inside the run folder (``run/mixture/data/...`` → ``RUN/mixture/data/...``)."""
    p = Path(recorded)
    if p.is_absolute() or p.exists():
        return p
    for i in range(len(p.parts)):
        candidate = root.joinpath(*p.parts[i:])
        if candidate.exists():
            return candidate
    return p


class LazyCheckpoint:
    """A checkpoint's tensors by name, read one at a time from its (memory-mapped) safetensors files."""

    def __init__(self, folder: Path):
        from merit.merge import safetensors_io as st

        self.folder = folder
        self.entries = st.checkpoint_tensors(folder)
        self._files: dict[Path, object] = {}

    def __getitem__(self, name: str):
        from safetensors import safe_open

        file = self.entries[name].file
        if file not in self._files:
            self._files[file] = safe_open(str(file), framework="pt")
        return self._files[file].get_tensor(name)
