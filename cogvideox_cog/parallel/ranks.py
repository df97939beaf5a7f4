"""One rank process: a full model on its own GPU (or CPU), driven over a pipe by group.py.

Every rank runs the same VideoGenerator code on the same request: prepare (so a bad input
fails on every rank with the same InputError), then the denoise, split by the engine
(engine.py). Rank 0 alone decodes and writes the mp4, and its log lines and metrics go back
to the Cog process, which logs them in the prediction. A cancel is a shared flag that every
rank reads after each step; the ranks agree on it with an all_reduce, so all of them stop
after the same step and none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import socket
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

import torch
import torch.distributed as dist

from ..errors import EnhanceError, InputError, LoraError
from ..generator import VideoGenerator
from ..logs import disable_progress_bars
from ..lora import store as lora_store
from ..pipeline import Mode
from ..postprocess import Offer, Postprocessor
from ..prompts.enhance import config_from_env
from ..weights.download import shown, stop_waiting_when
from .engine import ContextParallel
from .lifetime import exit_with_parent
from .protocol import (
    Canceled,
    Check,
    Done,
    Failed,
    LogLine,
    Metric,
    Outcome,
    Progress,
    Read,
    Reading,
    Ready,
    Render,
    SettingUp,
    SetupFailed,
    SetupStep,
    StepEnded,
)

log = logging.getLogger(__name__)

RENDEZVOUS_HOST = "127.0.0.1"  # the ranks and the Cog process share one machine
COLLECTIVE_TIMEOUT_FLOOR = timedelta(minutes=30)  # gloo's default
COLLECTIVE_TIMEOUT_MARGIN = timedelta(minutes=5)  # rank 0's checks around the download
PROGRESS_EVERY_S = 1.0  # rank 0's Progress messages, at most one in this long


class StepCanceled(BaseException):
    """Raised in the step callback, on every rank at the same step, to stop the pipeline.
    A BaseException, as Cog's own CancelationException, so no `except Exception` eats it."""

    def __init__(self, step: int):
        super().__init__(f"canceled after step {step + 1}" if step >= 0 else "canceled")
        self.step = step  # -1: before the first step, or rank 0 post-processing after the last


def serve(
    rank: int, world_size: int, mode: Mode, port: int, conn: Connection, cancel: Event
) -> None:
    """The rank process's main: set up, say Ready (or SetupFailed), then render until told
    to stop. It then ends at once: nothing is left to save, and the interpreter's own
    teardown of torch and the model takes seconds (12 s seen on a loaded 2-core machine)."""
    exit_with_parent()
    sender = _Sender(conn)
    _forward_logs(sender, rank)
    try:
        generator = _set_up(rank, world_size, mode, port, cancel, sender)
    except BaseException as error:
        log.exception("setup failed")  # the traceback, into the setup logs
        sender.send(SetupFailed(rank, _describe(error), _gave_up_waiting(error)))
        _exit(1)
    sender.send(Ready(rank))
    while True:
        try:
            command = conn.recv()
        except EOFError:  # the Cog process is gone
            _exit(1)
        if command is None:
            _exit(0)
        if isinstance(command, Check):
            sender.send(_check(generator, rank, command))
        else:
            sender.send(Reading(rank))
            sender.send(_render(generator, rank, command, cancel))


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _set_up(
    rank: int, world_size: int, mode: Mode, port: int, cancel: Event, sender: _Sender
) -> VideoGenerator:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # N ranks share the machine's cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    sender.send(SettingUp(rank, SetupStep.JOINING))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.TCPStore(RENDEZVOUS_HOST, port, is_master=False, timeout=collective_timeout()),
        rank=rank,
        world_size=world_size,
        device_id=device if cuda else None,
        timeout=collective_timeout(),
    )
    generator = VideoGenerator.from_env(
        mode,
        device=device,
        warm_up=False,
        rewrites_prompts=rank == 0,
        engine=ContextParallel(world_size),
        postprocessing=functools.partial(_postprocessor_then_load, rank, sender),
    )
    sender.send(SettingUp(rank, SetupStep.VAE_TILING))
    agree_on_vae_tiling(generator.pipe, device)
    generator.on_step = AgreedCancel(cancel, device)
    generator.lora_cache = LoraFetchedOnce(generator.lora_cache, rank, device)
    generator.on_inputs_read = lambda: sender.send(Read(rank))
    if config_from_env() is not None:  # the same setting on every rank
        generator.enhancer = RewrittenOnce(generator.enhancer, rank)
    sender.send(SettingUp(rank, SetupStep.WARM_UP))
    generator.compile_warm_up()  # with the engine in place: it compiles the split model
    if rank == 0:
        generator.record_metric = lambda name, value: sender.send(Metric(name, value))
        generator.on_postprocess_progress = OwnCancel(cancel)
        generator.on_step = ReportedSteps(generator.on_step, sender)
        ReportedProgress(sender).install(generator.pipe.transformer)
    return generator


def _postprocessor_then_load(rank: int, sender: _Sender, device: torch.device) -> Postprocessor:
    """postprocessor_of, which VideoGenerator.from_env calls just before it loads the model:
    the worker is told of both steps."""
    sender.send(SettingUp(rank, SetupStep.POSTPROCESSING))
    postprocessor = postprocessor_of(rank, device)
    sender.send(SettingUp(rank, SetupStep.LOADING))
    return postprocessor


def agree_on_vae_tiling(pipe, device: torch.device) -> None:
    """Tile on every rank if any rank tiles (a collective).

    Every rank encodes the image-to-video image or the video-to-video clip with its own VAE,
    and tiled and whole-frame encodes give different latents. COGVIDEOX_VAE_TILING=auto
    chooses by each GPU's free memory, so GPUs with more or less of it free would condition
    the halves of one step on different latents: a video no single GPU makes. Tiling needs
    less memory, so it is the choice every rank can keep."""
    tiled = torch.tensor([int(pipe.vae.use_tiling)], device=device)
    dist.all_reduce(tiled, op=dist.ReduceOp.MAX)
    if tiled.item() and not pipe.vae.use_tiling:
        pipe.vae.enable_tiling()
        log.info("VAE tiling on, as on another GPU with less memory free")


def postprocessor_of(rank: int, device: torch.device) -> Postprocessor:
    """The upscale and interpolate models, fetched and loaded by rank 0 alone: it alone
    post-processes the decoded frames. Another rank gets what rank 0's models offer and no
    model, so that it checks a request's upscale and interpolate as rank 0 does. A
    collective: where rank 0 fails (a bad COGVIDEOX_UPSCALE_URL), its SetupFailed fails
    setup with its error, and the group stops the ranks waiting here."""
    offer: list[Offer | None] = [None]
    if rank == 0:
        postprocessor = Postprocessor.from_env(device)
        offer[0] = postprocessor.offer
    dist.broadcast_object_list(offer, src=0)
    return postprocessor if rank == 0 else Postprocessor(device=device, offer=offer[0])


def rendezvous_store() -> dist.TCPStore:
    """The store the ranks meet on (torch.distributed's rendezvous), served by the Cog
    process from a socket bound here: on loopback only (TCPStore's own binds every
    interface, open to the network) and from the start (picking a free port, releasing it
    and binding it again in rank 0 let another program take it meanwhile). Its server lives
    as long as the returned object, which owns the socket."""
    listener = socket.socket()
    listener.bind((RENDEZVOUS_HOST, 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    return dist.TCPStore(
        RENDEZVOUS_HOST,
        port,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )


def collective_timeout() -> timedelta:
    """How long a rank may wait inside one collective before torch aborts the process.

    The longest wait that is not a fault: the other ranks at rank 0's broadcast while it
    downloads a LoRA (COGVIDEOX_LORA_TIMEOUT) and rewrites the prompt
    (COGVIDEOX_ENHANCE_TIMEOUT, which bounds an endpoint's whole exchange or a local model's
    generation; counted twice, for what lies outside it, such as a local model's move to the
    GPU). NCCL's default, 10 minutes, is the LoRA download's own default, so NCCL's watchdog
    would kill the waiting ranks before rank 0 reported a slow URL; gloo's 30 minutes is
    kept as the floor. A rank that dies is noticed at once anyway (its process ends).
    """
    enhance = config_from_env()
    alone = lora_store.timeout_s() + (2 * enhance.timeout if enhance else 0.0)
    return max(COLLECTIVE_TIMEOUT_FLOOR, timedelta(seconds=alone) + COLLECTIVE_TIMEOUT_MARGIN)


def _check(generator: VideoGenerator, rank: int, command: Check) -> Outcome:
    try:
        generator.check(command.request)
        return Done(rank, None)
    except InputError as error:
        return Failed(rank, _portable(error))
    except Exception as error:
        log.exception("checking the request failed")
        return Failed(rank, _portable(error))


def _render(generator: VideoGenerator, rank: int, command: Render, cancel: Event) -> Outcome:
    """The rank's outcome; a cancel's or failure's tensors let go of once it is logged."""
    try:
        if rank == 0:
            # Its LoRA download and prompt rewrite, which the others wait for, stop at the
            # cancel as on one GPU: no step would come to stop them until they end.
            with stop_waiting_when(OwnCancel(cancel)):
                return Done(rank, generator.render_kept(command.request))
        generator.denoise_only(command.request)
        return Done(rank, None)
    except StepCanceled as canceled:
        generator.let_go_of(canceled)
        return Canceled(rank, canceled.step)
    except InputError as error:  # the user's to fix: the message says what
        generator.let_go_of(error)
        return Failed(rank, _portable(error))
    except Exception as error:
        log.exception("prediction failed")  # the traceback, into the logs
        generator.let_go_of(error)
        return Failed(rank, _portable(error), generator.device_lost)


class AgreedCancel:
    """The step callback's cancel check: every rank stops after the same step as soon as any
    rank sees the flag. One all_reduce of one number per step."""

    def __init__(self, flag: Event, device: torch.device):
        self.flag, self.device = flag, device

    def __call__(self, step: int, seconds: float) -> None:
        wanted = torch.tensor([int(self.flag.is_set())], device=self.device)
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
        if wanted.item():
            raise StepCanceled(step)


class ReportedSteps:
    """Rank 0's step callback: how long each step took goes to the Cog process, which after a
    cancel waits for the step under way as long as the steps take; then the agreed cancel."""

    def __init__(self, on_step, sender: _Sender):
        self.on_step, self.sender = on_step, sender

    def __call__(self, step: int, seconds: float) -> None:
        self.sender.send(StepEnded(seconds))
        self.on_step(step, seconds)


class ReportedProgress:
    """Rank 0's sign of life within a step: a Progress, at most every PROGRESS_EVERY_S, as
    a transformer block starts. After a cancel the worker waits while these come, so a step
    under way that outlasts CANCEL_BOUND_S (the first of a large video, offloaded weights)
    is not taken for stuck ranks; ranks stuck in a collective reach no further block.

    A forward pre-hook on each block: Module.__call__ runs it before the block's compiled
    forward, outside the graph, and dynamo is told to leave the hook itself uncompiled."""

    def __init__(self, sender: _Sender):
        self.sender, self.last = sender, float("-inf")

    def install(self, transformer: torch.nn.Module) -> None:
        hook = torch.compiler.disable(self._block_starts)
        for block in transformer.transformer_blocks:
            block.register_forward_pre_hook(hook)

    def _block_starts(self, block: torch.nn.Module, args: tuple) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.sender.send(Progress())


class OwnCancel:
    """Rank 0's cancel check while it post-processes alone (the other ranks are done, so
    nothing is agreed): it stops between two frames or frame pairs."""

    def __init__(self, flag: Event):
        self.flag = flag

    def __call__(self) -> None:
        if self.flag.is_set():
            raise StepCanceled(-1)


CANCELED = "canceled"  # what rank 0 tells the others when a cancel stopped its own work


class RewrittenOnce:
    """enhance_prompt across ranks: rank 0 rewrites (one call to the model or endpoint, whose
    answers need not repeat) and sends the text to the others, so every rank encodes the same
    prompt; if rank 0 fails, all fail, and if it is canceled, all are; none waits."""

    def __init__(self, enhancer, rank: int):
        self.enhancer, self.rank = enhancer, rank

    def enhance(self, prompt: str, **kwargs) -> str:
        box: list[tuple[str, str] | None] = [None]  # ("text", rewrite) or (CANCELED, "")
        if self.rank == 0:
            try:
                box[0] = ("text", self.enhancer.enhance(prompt, **kwargs))
            except StepCanceled:
                box[0] = (CANCELED, "")
                raise
            finally:
                dist.broadcast_object_list(box, src=0)
            return box[0][1]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            raise EnhanceError("rank 0 could not rewrite the prompt: see its error")
        if box[0][0] == CANCELED:
            raise StepCanceled(-1)
        return box[0][1]


class LoraFetchedOnce:
    """The LoRA cache as the ranks share it: rank 0 fetches (one download), then tells the
    others, which read the file from the cache; if rank 0 fails, all fail, and if it is
    canceled, all are; none waits."""

    FAILED, FETCHED, CANCELED = 0, 1, 2

    def __init__(self, cache, rank: int, device: torch.device):
        self.cache, self.rank, self.device = cache, rank, device

    def get(self, url: str):
        if self.rank != 0:
            said = self._rank_0_says(self.FAILED)
            if said == self.CANCELED:
                raise StepCanceled(-1)
            if said != self.FETCHED:
                raise LoraError(f"rank 0 could not fetch lora_url {shown(url)}: see its error")
            return self.cache.get(url)
        try:
            path = self.cache.get(url)
        except StepCanceled:
            self._rank_0_says(self.CANCELED)
            raise
        except BaseException:
            self._rank_0_says(self.FAILED)
            raise
        self._rank_0_says(self.FETCHED)
        return path

    def _rank_0_says(self, outcome: int) -> int:
        flag = torch.tensor([outcome], device=self.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())


class _Sender:
    """conn.send for several threads (the main one and logging from any)."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, message) -> None:
        with self.lock:
            self.conn.send(message)


class _ForwardHandler(logging.Handler):
    def __init__(self, sender: _Sender, prefix: str):
        super().__init__()
        self.sender, self.prefix = sender, prefix

    def emit(self, record: logging.LogRecord) -> None:
        # OSError: the pipe is gone, the Cog process ended (this process follows it).
        with contextlib.suppress(OSError, ValueError):
            self.sender.send(LogLine(record.levelno, self.prefix + self.format(record)))


# Whose warnings describe the request's own inputs (a prompt past the text encoder's tokens,
# an image's colour profile, a damaged clip): every rank reads the same inputs and would say
# the same, so rank 0 says it once.
REQUEST_LOGGERS = ("cogvideox_cog.generator", "cogvideox_cog.media")


def _not_about_the_request(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
        return True
    return not any(
        record.name == name or record.name.startswith(name + ".") for name in REQUEST_LOGGERS
    )


def _forward_logs(sender: _Sender, rank: int) -> None:
    """The package's log lines go to the Cog process: all of rank 0's, so that a prediction's
    logs read as on one GPU; the other ranks' warnings and errors, marked with their rank,
    but for warnings about the request, which every rank would repeat: rank 0 gives them."""
    handler = _ForwardHandler(sender, "" if rank == 0 else f"rank {rank}: ")
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank != 0:
        handler.addFilter(_not_about_the_request)
    handler.setFormatter(logging.Formatter("%(message)s"))
    disable_progress_bars()
    logger = logging.getLogger("cogvideox_cog")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _gave_up_waiting(error: BaseException) -> bool:
    """Whether torch.distributed stopped waiting for the other ranks (collective_timeout):
    gloo's collectives raise a RuntimeError ("Timed out waiting 1800000ms for recv
    operation"), the rendezvous store a DistStoreError ("wait timeout after ...ms")."""
    if type(error) is not RuntimeError and not isinstance(error, dist.DistError):
        return False
    said = str(error).lower()
    return "timed out" in said or "timeout" in said


def _portable(error: Exception) -> Exception:
    """The error itself if it survives the pipe, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(_describe(error))
