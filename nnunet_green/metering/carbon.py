"""Carbon intensity and PUE settings: a small bundled country table, overridable by environment variables.

The variables (`nnUNet_green_country`, `nnUNet_green_carbon_intensity`, `nnUNet_green_pue`) are read and validated
by `contract.GreenSettings`; this module only turns them into a `CarbonSetting`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Mapping

from nnunet_green.contract import ENV, GreenSettings, SettingsError, env_name

COUNTRY_ENV = env_name("country")                   # ISO 3166 alpha-3 (or alpha-2) code in the bundled table
INTENSITY_ENV = env_name("carbon_intensity")        # gCO2eq/kWh; wins over the country table
PUE_ENV = env_name("pue")                           # data-centre power usage effectiveness
DEFAULT_COUNTRY = ENV[COUNTRY_ENV].default


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


def carbon_setting(settings: GreenSettings | Mapping[str, str] | None = None) -> CarbonSetting:
    """The carbon setting chosen by `settings` (default: the environment, or a mapping of variables): an explicit
    intensity, else the country table (default WORLD). Bad values raise `SettingsError`."""
    if not isinstance(settings, GreenSettings):
        settings = GreenSettings.from_env(settings)
    country = settings.country.upper() or DEFAULT_COUNTRY
    if settings.carbon_intensity is not None:
        # The country is only a label here; the default is not recorded as if the user had chosen it.
        return CarbonSetting(settings.carbon_intensity, f"user ({INTENSITY_ENV})",
                             None if country == DEFAULT_COUNTRY else country, settings.pue)
    table = _table()
    resolved = table["aliases"].get(country, country)
    if resolved not in table["countries"]:
        known = ", ".join(sorted(table["countries"]))
        raise SettingsError(f"{COUNTRY_ENV}={country!r} is not in the bundled table ({known}); "
                            f"set {INTENSITY_ENV} to your grid's gCO2eq/kWh instead")
    return CarbonSetting(table["countries"][resolved], table["source"], resolved, settings.pue)
