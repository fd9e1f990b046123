"""van-tfx: shared foundation (environment guard, typed config, CLI) for the VAN TFX pipeline."""

from van_tfx import env as _env

_env.require_legacy_keras()
_env.silence_unactionable_warnings()
