"""The presets of ``sdl_jax/configs/sdl.py`` (documented there), for checkout commands.

``python run.py --config=configs/sdl.py:<preset>`` loads this file by its path, as
``ml_collections.config_flags`` does; the configs themselves ship inside the package, so
the installed ``sdl-jax`` command finds them from any folder (``--config=<preset>``).
"""

from sdl_jax.configs.sdl import PRESETS, get_config  # pylint: disable=unused-import
