"""The eSpeak NG engines behind the synthetic corpus (:mod:`.synthetic`): libespeak-ng through ``ctypes`` (a
private copy of the library per speaker, re-seeded per utterance, so a speaker's audio is a pure function of its
seed) or the ``espeak-ng`` command-line program as a fallback."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from lightning_fedprune.validation import check_choice

ESPEAK_RATE = 22050  # espeak-ng's native output rate

# --------------------------------------------------------------------------------------
# eSpeak NG engines
# --------------------------------------------------------------------------------------

_SYNTH_LOCK = threading.Lock()  # libc rand() is process-global: one synthesis at a time

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_espeakCHARS_UTF8 = 1
_espeakRATE, _espeakVOLUME, _espeakPITCH = 1, 2, 3

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _libc():
    try:
        if sys.platform == "win32":
            return ctypes.CDLL("msvcrt")
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover
        return None


class _CtypesEngine:
    """A private instance of libespeak-ng loaded from a temporary copy of the wheel's library.

    Every instance has fresh static state, so its output depends only on what *it* synthesised.
    """

    backend = "ctypes"

    def __init__(self) -> None:
        import espeakng_loader

        lib_src = espeakng_loader.get_library_path()
        data = espeakng_loader.get_data_path()
        self._tmpdir = tempfile.mkdtemp(prefix="fedprune-espeak-")
        self._path = os.path.join(self._tmpdir, "libespeak-ng-" + uuid.uuid4().hex[:8] + Path(lib_src).suffix)
        shutil.copyfile(lib_src, self._path)
        self._lib = None
        try:
            lib = ctypes.CDLL(self._path, mode=getattr(os, "RTLD_LOCAL", 0))
            self._lib = lib
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetVoiceByName.restype = ctypes.c_int
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetParameter.restype = ctypes.c_int
            lib.espeak_Synth.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]  # fmt: skip
            lib.espeak_Synth.restype = ctypes.c_int
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
            sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({sr}) with data path {data}")
            self.sample_rate = int(sr)
            self.version = lib.espeak_Info(None).decode()
            self._chunks: list[np.ndarray] = []
            self._callback = _SYNTH_CALLBACK(self._on_samples)  # keep a reference
            lib.espeak_SetSynthCallback(self._callback)
            self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
            if self._set_seed is not None:
                self._set_seed.argtypes = [ctypes.c_long]
            self._libc = _libc()
        except BaseException:
            self.close()
            raise

    def _on_samples(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        lib = self._lib
        with _SYNTH_LOCK:
            self._chunks = []
            if self._libc is not None:
                self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
            if self._set_seed is not None:
                self._set_seed(seed & 0x7FFFFFFF)
            err = lib.espeak_SetVoiceByName(voice.encode())
            if err != 0:
                raise ValueError(f"eSpeak NG voice {voice!r} not found (error {err})")
            lib.espeak_SetParameter(_espeakRATE, int(rate), 0)
            lib.espeak_SetParameter(_espeakPITCH, int(pitch), 0)
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _espeakCHARS_UTF8, None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with error {err} for {text!r}")
            lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def close(self) -> None:
        lib, self._lib = self._lib, None
        if lib is not None:
            try:
                lib.espeak_Terminate()
            finally:
                with contextlib.suppress(Exception):
                    import _ctypes

                    (_ctypes.dlclose if hasattr(_ctypes, "dlclose") else _ctypes.FreeLibrary)(lib._handle)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __del__(self) -> None:  # pragma: no cover - safety net
        with contextlib.suppress(Exception):
            self.close()


class _CliEngine:
    """Fallback: the ``espeak-ng`` program (one process per utterance, hence stateless)."""

    backend = "cli"
    sample_rate = ESPEAK_RATE

    def __init__(self, exe: Optional[str] = None) -> None:
        self.exe = exe or shutil.which("espeak-ng")
        if not self.exe:
            raise RuntimeError("the espeak-ng program was not found on PATH")
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, check=True).stdout
        self.version = out.split("text-to-speech:")[-1].split()[0] if "text-to-speech:" in out else out.strip()
        self._tmpdir = tempfile.mkdtemp(prefix="fedprune-espeak-")

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        import soundfile as sf

        wav = os.path.join(self._tmpdir, "utt.wav")
        subprocess.run(
            [self.exe, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "-w", wav, text],
            check=True, capture_output=True,
        )  # fmt: skip
        data, sr = sf.read(wav, dtype="int16")
        self.sample_rate = int(sr)
        return data if data.ndim == 1 else data[:, 0]

    def close(self) -> None:
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def espeak_backend(backend: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"ctypes"`` (espeakng-loader wheel) or ``"cli"`` (espeak-ng program)."""
    check_choice(backend, "backend", ("auto", "ctypes", "cli"))
    if backend != "auto":
        return backend
    try:
        import espeakng_loader

        if Path(espeakng_loader.get_library_path()).is_file():
            return "ctypes"
    except ImportError:
        pass
    if shutil.which("espeak-ng"):
        return "cli"
    raise RuntimeError(
        "eSpeak NG is not available: `pip install espeakng-loader` (ships libespeak-ng and its voice data; "
        "no root needed) or install the espeak-ng program"
    )


def _make_engine(backend: str):
    backend = espeak_backend(backend)
    return _CtypesEngine() if backend == "ctypes" else _CliEngine()


_ENGINE_IDS: dict[str, str] = {}


def _engine_id(backend: str) -> str:
    """``"<backend>:<espeak version>"`` (part of the cache key: another eSpeak gives other audio)."""
    backend = espeak_backend(backend)
    if backend not in _ENGINE_IDS:
        if backend == "ctypes":
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
            version = lib.espeak_Info(None).decode()
        else:
            eng = _CliEngine()
            version = eng.version
            eng.close()
        _ENGINE_IDS[backend] = f"{backend}:{version}"
    return _ENGINE_IDS[backend]


