"""The parts of LeRobot's LIBERO env that ``libero_rgbd`` builds on, pinned: a LeRobot release that changes
one of them fails here, naming it, instead of somewhere inside a simulator run.

``envs/libero_rgbd_sim.py`` subclasses ``lerobot.envs.libero.LiberoEnv`` (overriding ``_ensure_env`` and
``_format_raw_obs``), builds its vector envs as ``create_libero_envs`` does (which cannot take another env
class) and reuses ``_LazyAsyncVectorEnv``. No simulator runs here.
"""

import ast
import dataclasses
import inspect
import textwrap

import pytest
from lerobot.envs.configs import EnvConfig
from lerobot.envs.configs import LiberoEnv as LiberoEnvConfig
from lerobot.envs.utils import _LazyAsyncVectorEnv

from lerobot_llava3d_fusion.envs import libero_rgbd_sim
from lerobot_llava3d_fusion.envs.libero_rgbd import LiberoRGBDEnvConfig
from lerobot_llava3d_fusion.tools.libero_setup import ensure_libero_ready

# Arguments `create_libero_rgbd_envs` passes to the env besides the config's `gym_kwargs`.
ENV_ARGUMENTS = {"task_suite", "task_id", "task_suite_name", "camera_name", "init_states", "episode_length",
                 "episode_index", "n_envs", "control_mode", "camera_name_mapping", "is_libero_plus"}  # fmt: skip
# What `create_libero_rgbd_envs` mirrors of `create_libero_envs` (whose `env_cls` is the vector env).
CREATE_LIBERO_ENVS_PARAMETERS = ["task", "n_envs", "gym_kwargs", "camera_name", "init_states", "env_cls",
                                 "control_mode", "episode_length", "camera_name_mapping", "is_libero_plus"]  # fmt: skip
# LiberoEnv attributes the camera-geometry mixin reads.
ENV_ATTRIBUTES = ["observation_height", "observation_width", "camera_name", "camera_name_mapping",
                  "control_freq", "hard_reset", "_task_bddl_file", "_env", "observation_space"]  # fmt: skip


@pytest.fixture(scope="module")
def lerobot_libero():
    """``lerobot.envs.libero``, imported after LIBERO is set up."""
    ensure_libero_ready()
    from lerobot.envs import libero

    return libero


def offscreen_env_keywords(function) -> dict[str, str]:
    """``{keyword: source of its value}`` of the ``OffScreenRenderEnv(...)`` call in ``function``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "OffScreenRenderEnv"
    ]
    assert len(calls) == 1, f"{function.__qualname__} no longer builds one OffScreenRenderEnv"
    return {keyword.arg: ast.unparse(keyword.value) for keyword in calls[0].keywords}


def test_libero_env_takes_the_arguments_we_pass(lerobot_libero):
    parameters = set(inspect.signature(lerobot_libero.LiberoEnv.__init__).parameters)
    # Keyword-only arguments of our mixin are consumed there and never reach LeRobot's constructor.
    ours = {
        name
        for name, parameter in inspect.signature(
            libero_rgbd_sim.CameraGeometryMixin.__init__
        ).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    assert "instruction_perturbation" in ours
    gym_kwargs = set(LiberoRGBDEnvConfig(task_ids=[0]).gym_kwargs) - {"task_ids"} - ours
    missing = (ENV_ARGUMENTS | gym_kwargs) - parameters
    assert not missing, f"lerobot.envs.libero.LiberoEnv no longer takes {sorted(missing)}"


def test_libero_env_hooks_we_override_are_still_called(lerobot_libero):
    env_class = lerobot_libero.LiberoEnv
    for name, parameters in (("_ensure_env", ["self"]), ("_format_raw_obs", ["self", "raw_obs"])):
        assert hasattr(env_class, name), f"lerobot.envs.libero.LiberoEnv has no {name} any more"
        assert list(inspect.signature(getattr(env_class, name)).parameters) == parameters, name
    for method in ("reset", "step"):
        source = inspect.getsource(getattr(env_class, method))
        for call in ("self._ensure_env()", "self._format_raw_obs("):
            assert call in source, f"LiberoEnv.{method} no longer calls {call}"
    init_source = inspect.getsource(env_class.__init__)
    for attribute in ENV_ATTRIBUTES:
        assert f"self.{attribute} =" in init_source or f"self.{attribute}: " in init_source, (
            f"LiberoEnv.__init__ no longer sets {attribute}"
        )


def test_our_simulator_is_built_as_lerobots_plus_depth(lerobot_libero):
    theirs = offscreen_env_keywords(lerobot_libero.LiberoEnv._ensure_env)
    ours = offscreen_env_keywords(libero_rgbd_sim.CameraGeometryMixin._ensure_env)
    assert ours == {**theirs, "camera_depths": "True"}, (
        f"LiberoEnv._ensure_env now builds OffScreenRenderEnv with {theirs}; CameraGeometryMixin._ensure_env "
        "must do the same plus camera_depths=True"
    )


def test_libero_rgbd_env_is_lerobots_env_and_pickles_by_name(lerobot_libero):
    import pickle

    env_class = libero_rgbd_sim.LiberoRGBDEnv
    assert issubclass(env_class, lerobot_libero.LiberoEnv)
    assert env_class is libero_rgbd_sim.libero_rgbd_env_class()
    assert pickle.loads(pickle.dumps(env_class)) is env_class  # async vector envs send it to workers


def test_our_vector_envs_follow_create_libero_envs(lerobot_libero):
    parameters = list(inspect.signature(lerobot_libero.create_libero_envs).parameters)
    assert parameters == CREATE_LIBERO_ENVS_PARAMETERS, (
        f"create_libero_envs now takes {parameters}: mirror the change in create_libero_rgbd_envs "
        "(or use create_libero_envs if it can now build another env class)"
    )
    lazy = list(inspect.signature(_LazyAsyncVectorEnv.__init__).parameters)
    assert lazy == ["self", "env_fns", "observation_space", "action_space", "metadata"], lazy


def test_the_env_config_fields_we_read():
    fields = {field.name for field in dataclasses.fields(LiberoEnvConfig)}
    read = {"task", "task_ids", "camera_name", "camera_name_mapping", "init_states", "episode_length",
            "control_mode", "is_libero_plus", "observation_height", "observation_width"}  # fmt: skip
    assert read <= fields, f"lerobot.envs.configs.LiberoEnv lost {sorted(read - fields)}"
    ours = list(inspect.signature(LiberoRGBDEnvConfig.create_envs).parameters)
    assert list(inspect.signature(EnvConfig.create_envs).parameters) == ours
