"""Carbon intensity and PUE settings: a small bundled country table, overridable by environment variables."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from importlib import resources

COUNTRY_ENV = "nnUNet_green_country"              # ISO 3166 alpha-3 (or alpha-2) code in the bundled table
INTENSITY_ENV = "nnUNet_green_carbon_intensity"   # gCO2eq/kWh; wins over the country table
PUE_ENV = "nnUNet_green_pue"                      # data-centre power usage effectiveness, default 1.0
DEFAULT_COUNTRY = "WORLD"


@dataclass(frozen=True)
class CarbonSetting:
    intensity_g_per_kwh: float
    source: str
    country: str | None
    pue: float = 1.0

    def co2eq_g(self, energy_j: float | None) -> float | None:
        """Grams CO2eq for `energy_j` joules of IT energy (PUE applied here, not to the energy figures)."""
        if energy_j is None:
            return None
        return energy_j / 3.6e6 * self.pue * self.intensity_g_per_kwh

    def to_dict(self) -> dict:
        return asdict(self)


def _table() -> dict:
    return json.loads(resources.files(__package__).joinpath("carbon_intensity.json").read_text())


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


def carbon_setting(environ: dict | None = None) -> CarbonSetting:
    """The carbon setting chosen by the environment: explicit intensity, else country table (default WORLD)."""
    env = os.environ if environ is None else environ
    pue = _positive_float(PUE_ENV, env[PUE_ENV]) if env.get(PUE_ENV) else 1.0
    if env.get(INTENSITY_ENV):
        return CarbonSetting(_positive_float(INTENSITY_ENV, env[INTENSITY_ENV]), f"user ({INTENSITY_ENV})",
                             env.get(COUNTRY_ENV) or None, pue)
    table = _table()
    requested = (env.get(COUNTRY_ENV) or DEFAULT_COUNTRY).strip().upper()
    country = table["aliases"].get(requested, requested)
    if country not in table["countries"]:
        known = ", ".join(sorted(table["countries"]))
        raise ValueError(f"{COUNTRY_ENV}={requested!r} is not in the bundled table ({known}); "
                         f"set {INTENSITY_ENV} to your grid's gCO2eq/kWh instead")
    return CarbonSetting(table["countries"][country], table["source"], country, pue)
