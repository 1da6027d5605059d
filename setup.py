"""Extension modules only; metadata, dependencies and tool settings live in pyproject.toml.

CHORUS_BUILD_NATIVE says whether the native accelerators are built:
  "auto" (default): build them if a compiler is there, else install the pure-Python twins only;
  "always": fail the install if any extension does not build (CI uses this);
  "never": pure Python only.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODE = os.environ.get("CHORUS_BUILD_NATIVE", "auto").lower()
if MODE not in ("auto", "always", "never"):
    raise SystemExit(f"CHORUS_BUILD_NATIVE must be auto, always or never, not {MODE!r}")


class OptionalBuildExt(build_ext):  # type: ignore[misc]  # setuptools derives build_ext from an untyped base
    """Skip a failing extension in "auto" mode so the pure twins still install."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if MODE == "always":
                raise
            print(f"warning: native extension {ext.name} not built ({exc}); pure Python is used")


def cpp_extensions() -> list[Extension]:
    from pybind11.setup_helpers import Pybind11Extension

    # wsframe.cpp is the one frame codec: the hub parses with it, and _wsframe puts the same
    # code behind codec_pure's API (tests and the gateway's refusals). Same flags, same objects.
    flags = {"include_dirs": ["native/src"], "cxx_std": 17, "extra_compile_args": ["-O2", "-fvisibility=hidden"]}
    return [
        Pybind11Extension(
            "chorus.native._hub",
            ["native/src/hub_module.cpp", "native/src/hub.cpp", "native/src/hub_flush.cpp", "native/src/wsframe.cpp"],
            libraries=["z"],
            **flags,
        ),
        Pybind11Extension(
            "chorus.native._wsframe",
            ["native/src/wsframe_module.cpp", "native/src/wsframe.cpp"],
            libraries=["z"],  # wsframe.cpp holds the deflate helpers too
            **flags,
        ),
    ]


ext_modules = [] if MODE == "never" else cpp_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
