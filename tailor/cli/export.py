"""`tailor export-peft`: one user's adapter as a PEFT folder, from a serving store or from a run folder's states.

The folder is what `peft.PeftModel.from_pretrained(base, folder)` loads (and vLLM or LoRAX serve); its
`adapter_config.json` names as `base_model_name_or_path` the local model folder the adapter was made for (a packaged
model's converted copy in the cache, or the folder given), so `AutoPeftModelForCausalLM.from_pretrained(folder)` finds
its base. Methods whose state is an adapter export (lora-p, oppu, mt-lora, p2p); others are refused in one line.

From a store the method, task and backbone are the user's state's (or those of the deployment named in `--config`);
its options come from `--set` (those that decide the shared part of an adapter, e.g. OPPU's base, must be the
serving ones). From a run folder everything comes from its config.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tailor.cli._options import DataDir, Device, Dtype, SetOptions, build, check_options, console, parse_options

if TYPE_CHECKING:  # the method modules import torch; `tailor --help` should not
    from tailor.methods.base import Personalizer
    from tailor.store.state import UserState


def export_peft_command(
    out: Annotated[Path, typer.Option(help="the PEFT folder to write")],
    user: Annotated[str, typer.Option(help="the user whose adapter is exported")],
    store: Annotated[Optional[Path], typer.Option(help="a serving store (with --tenant)")] = None,
    tenant: Annotated[Optional[str], typer.Option(help="the user's tenant: name or id")] = None,
    deployment: Annotated[Optional[str], typer.Option(
        help="the deployment whose state to export (default: the user's only one)")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="the serve config: the deployment's method, options and model")] = None,
    run: Annotated[Optional[Path], typer.Option(help="a run folder (tailor eval/personalize --out) instead of a "
                                                     "store")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="the backbone (default: the one the state names, when it is a packaged model)")] = None,
    set_: SetOptions = [],
    device: Device = "auto",
    dtype: Dtype = "auto",
    data_dir: DataDir = None,
) -> None:
    """Write a user's adapter as a PEFT folder whose base_model_name_or_path is its local model folder."""
    if (run is None) == (store is None):
        raise typer.BadParameter("give --store (with --tenant) or --run", param_hint="--store")
    if run is not None:
        method, state, model_name = from_run(run, user, model, device, dtype)
    elif tenant is None:
        raise typer.BadParameter("--store needs --tenant", param_hint="--tenant")
    else:
        assert store is not None
        method, state, model_name = from_store(store, tenant, user, deployment, config, model, parse_options(set_),
                                               device, dtype, data_dir)
    export = getattr(method, "export_peft", None)
    if export is None:
        raise typer.BadParameter(f"{method.name} keeps no adapter to export; lora-p, oppu, mt-lora and p2p do",
                                 param_hint="--user")
    from tailor.backbone.loading import resolve_model

    folder = Path(export(state, out))
    adapter_config = folder / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = str(resolve_model(model_name)[1].resolve())
    adapter_config.write_text(json.dumps(settings, indent=2))
    console.print(f"{method.name} adapter of user {user!r} in {folder} (base {settings['base_model_name_or_path']})")


def backbone_of(model_id: str | None, model: str | None) -> str:
    """The model to load: the one given, else the packaged model a state's model id names."""
    from tailor.backbone.loading import ModelNotFound, resolve_model

    name = model or (model_id or "").rsplit("/", 1)[0]
    try:
        resolve_model(name)
    except ModelNotFound:
        raise typer.BadParameter(f"the state was made with {model_id!r}, not a packaged model: give its folder as "
                                 "--model", param_hint="--model") from None
    return name


def from_run(run: Path, user: str, model: str | None, device: str, dtype: str) -> tuple[Personalizer, UserState, str]:
    """The run's method, fitted as the run fitted it, and the user's state in its states/."""
    from tailor.runs.fits import fit_for_spec
    from tailor.runs.record import RunDirError
    from tailor.runs.spec import EvalSpec
    from tailor.store.paths import state_path
    from tailor.store.state import UserState

    try:
        recorded = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise RunDirError(f"{run}/config.json: {error}") from None
    fields = {f.name for f in dataclasses.fields(EvalSpec)} - {"users", "model", "device", "dtype"}
    name = backbone_of(recorded.get("model"), model)
    spec = EvalSpec(**{k: v for k, v in recorded.items() if k in fields}, model=name, device=device, dtype=dtype)
    method = build(spec.method, spec.task, name, device, dtype, spec.options)
    fit_for_spec(method, spec)
    state = UserState.load(state_path(run / "states", user), method.name, method.version, method.model_id)
    return method, state, name


def from_store(store: Path, tenant: str, user: str, deployment: str | None, config: Path | None, model: str | None,
               options: dict[str, object], device: str, dtype: str,
               data_dir: Path | None) -> tuple[Personalizer, UserState, str]:
    """The method of the deployment whose state the user has (built and fitted as the server builds it), and that
    state."""
    from tailor.serve.build import build_methods
    from tailor.serve.config import ConfigError, DeploymentConfig, ServerConfig, load_config
    from tailor.store.store import Store

    opened = Store(store)
    tenant_id = opened.tenant_id(tenant)
    slots = opened.slots(tenant_id, user)
    slot = deployment or (slots[0] if len(slots) == 1 else None)
    if slot is None or slot not in slots:
        raise typer.BadParameter(f"user {user!r} has states of {', '.join(slots) or 'no deployment'}; name one with "
                                 "--deployment", param_hint="--deployment")
    record = opened.record(tenant_id, user, slot)
    if config is not None:
        try:
            served = load_config(config)
        except ConfigError as error:
            raise typer.BadParameter(str(error), param_hint="--config") from None
        spec = next((d for d in served.deployments if d.name == slot), None)
        if spec is None:
            raise typer.BadParameter(f"{config} has no deployment {slot!r}", param_hint="--config")
        data_dir = served.data_dir
    else:
        check_options(str(record.method), options)
        spec = DeploymentConfig(slot, record.task, str(record.method), backbone_of(record.model_id, model), device,
                                dtype, options)
    method = build_methods(ServerConfig(store=store, deployments=(spec,), default=slot, data_dir=data_dir))[slot]
    state = opened.load_state(tenant_id, user, method.name, method.version, method.model_id, record)
    return method, state, spec.model
