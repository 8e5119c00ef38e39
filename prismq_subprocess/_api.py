"""The whole top-level API, imported at once: ``prismq_subprocess`` imports this module the
first time one of its names is used (see ``__getattr__`` there), so ``import
prismq_subprocess`` itself, and pytest loading the plugin in a project that never uses it, cost
almost nothing. Each name is imported as itself (``X as X``): the package's ``TYPE_CHECKING``
import of this module gives type checkers every name.
"""

from __future__ import annotations

from asyncio.subprocess import DEVNULL as DEVNULL
from asyncio.subprocess import PIPE as PIPE
from asyncio.subprocess import STDOUT as STDOUT

from ._background._cancel_result import CancelResult as CancelResult
from ._background._executor import (
    ConcurrentExecutor as ConcurrentExecutor,
)
from ._background._executor import (
    ModuleSpec as ModuleSpec,
)
from ._background._log_names import (
    run_id_from_log_path as run_id_from_log_path,
)
from ._background._log_names import (
    run_log_path as run_log_path,
)
from ._background._memory_registry import RunRegistry as RunRegistry
from ._background._module_args import parameters_to_args as parameters_to_args
from ._background._module_runner import ModuleRunner as ModuleRunner
from ._background._orphan_stop import stop_orphan_tree as stop_orphan_tree
from ._background._output_capture import (
    OutputCapture as OutputCapture,
)
from ._background._output_capture import (
    OutputChunk as OutputChunk,
)
from ._background._output_capture import (
    OutputChunks as OutputChunks,
)
from ._background._output_capture import (
    OutputEnd as OutputEnd,
)
from ._background._output_capture import (
    OutputGap as OutputGap,
)
from ._background._output_capture import (
    OutputItem as OutputItem,
)
from ._background._output_capture import (
    OutputLine as OutputLine,
)
from ._background._output_capture import (
    OutputSubscription as OutputSubscription,
)
from ._background._periodic import (
    PeriodicTask as PeriodicTask,
)
from ._background._periodic import (
    PeriodicTaskStats as PeriodicTaskStats,
)
from ._background._process_manager import ProcessManager as ProcessManager
from ._background._run_record import Run as Run
from ._background._run_record import RunOwner as RunOwner
from ._background._run_record import RunStatus as RunStatus
from ._background._sqlite_registry import SQLiteRunRegistry as SQLiteRunRegistry
from ._background._sse import (
    SSE_HEADERS as SSE_HEADERS,
)
from ._background._sse import (
    SSEEvent as SSEEvent,
)
from ._background._sse import (
    sse_events as sse_events,
)
from ._background._task_manager import (
    BackgroundTaskManager as BackgroundTaskManager,
)
from ._background._task_manager import (
    ExitCode as ExitCode,
)
from ._background._task_manager import (
    TaskHandle as TaskHandle,
)
from ._background._wrapper_pool import ResourcePool as ResourcePool
from ._core._detect import (
    ENV_VAR as ENV_VAR,
)
from ._core._detect import (
    ModeDecision as ModeDecision,
)
from ._core._detect import (
    ModeSource as ModeSource,
)
from ._core._detect import (
    detect_run_mode as detect_run_mode,
)
from ._core._dropin import (
    create_subprocess_exec as create_subprocess_exec,
)
from ._core._dropin import (
    create_subprocess_shell as create_subprocess_shell,
)
from ._core._dropin import (
    run as run,
)
from ._core._event_loop import (
    install_subprocess_policy as install_subprocess_policy,
)
from ._core._event_loop import (
    subprocess_loop_factory as subprocess_loop_factory,
)
from ._core._exceptions import (
    ClosedError as ClosedError,
)
from ._core._exceptions import (
    CommandNotFoundError as CommandNotFoundError,
)
from ._core._exceptions import (
    InvalidParametersError as InvalidParametersError,
)
from ._core._exceptions import (
    ModuleExecutionException as ModuleExecutionException,
)
from ._core._exceptions import (
    OutputNotFoundError as OutputNotFoundError,
)
from ._core._exceptions import (
    PrismQError as PrismQError,
)
from ._core._exceptions import (
    ProcessFailedError as ProcessFailedError,
)
from ._core._exceptions import (
    ProcessTimeoutError as ProcessTimeoutError,
)
from ._core._exceptions import (
    ResourceLimitException as ResourceLimitException,
)
from ._core._exceptions import (
    ResourceWaitTimeoutError as ResourceWaitTimeoutError,
)
from ._core._exceptions import (
    RunNotFoundError as RunNotFoundError,
)
from ._core._exceptions import (
    ScriptNotFoundError as ScriptNotFoundError,
)
from ._core._exceptions import (
    SubprocessPolicyException as SubprocessPolicyException,
)
from ._core._exceptions import (
    TaskTimeoutError as TaskTimeoutError,
)
from ._core._host_shutdown import (
    ShutdownHandler as ShutdownHandler,
)
from ._core._host_shutdown import (
    install_shutdown_handler as install_shutdown_handler,
)
from ._core._host_shutdown import (
    stop_for_host_shutdown as stop_for_host_shutdown,
)
from ._core._line_stream import LineStream as LineStream
from ._core._lines import iter_line_batches as iter_line_batches
from ._core._lines import iter_lines as iter_lines
from ._core._modes import RunMode as RunMode
from ._core._result import (
    DEFAULT_MAX_OUTPUT_BYTES as DEFAULT_MAX_OUTPUT_BYTES,
)
from ._core._result import (
    ProcessResult as ProcessResult,
)
from ._core._tree_stop import (
    DEFAULT_GRACE_PERIOD as DEFAULT_GRACE_PERIOD,
)
from ._core._tree_stop import (
    containment_report as containment_report,
)
from ._core._tree_stop import (
    execute_with_timeout as execute_with_timeout,
)
from ._core._tree_stop import (
    terminate_gracefully as terminate_gracefully,
)
from ._core._tree_stop import (
    terminate_many as terminate_many,
)
from ._core._wrapper import SubprocessWrapper as SubprocessWrapper
from ._platform import ContainmentReport as ContainmentReport
from ._platform._orphans import OrphanCheck as OrphanCheck
from ._platform._orphans import ProcessIdentity as ProcessIdentity
from ._resources._memory_monitor import MemoryMonitor as MemoryMonitor
from ._resources._readings import (
    PsutilResourceReader as PsutilResourceReader,
)
from ._resources._readings import (
    ResourceSnapshot as ResourceSnapshot,
)
from ._resources._resource_manager import (
    LimitViolation as LimitViolation,
)
from ._resources._resource_manager import (
    ResourceCheck as ResourceCheck,
)
from ._resources._resource_manager import (
    ResourceManager as ResourceManager,
)
from ._resources._tree_sampler import (
    ProcessTreeSampler as ProcessTreeSampler,
)
from ._resources._tree_sampler import (
    TreeSample as TreeSample,
)
