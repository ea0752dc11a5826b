"""What a model's licence asks of its user, read from the model card's "license" field.

The default FLAIR model's weights follow their training data's licence, CC BY-NC-SA
(non-commercial). The panel asks the user to acknowledge such a licence once per
model (remembered under :func:`settings_key` in Slicer's settings); the Logic and
the command line only say it.
"""

from __future__ import annotations

import re

# Words of a licence text that mean "no commercial use": Creative Commons' NC element (BY-NC, BY-NC-SA,
# BY-NC-ND) and the word itself; "non-commercial" and "non commercial" are looked for as phrases.
_NON_COMMERCIAL_TOKENS = {"nc", "noncommercial"}


def is_non_commercial(license_text: str) -> bool:
    """Whether ``license_text`` (a model card's "license") forbids commercial use."""
    text = (license_text or "").lower()
    tokens = set(re.split(r"[\s\-/(),;:.]+", text))
    return bool(tokens & _NON_COMMERCIAL_TOKENS) or "non-commercial" in text or "non commercial" in text


def settings_key(model: str) -> str:
    """The settings key that remembers the licence text the user acknowledged for ``model``."""
    return "AutoDDPM/AcknowledgedLicenses/" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)
