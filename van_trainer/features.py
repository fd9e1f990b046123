"""The feature-name contract moved to `van_tfx.features` (the base both sides import downward).

Kept while other branches still import it from here; new code imports `van_tfx.features`.
"""

from van_tfx.features import *  # noqa: F403
