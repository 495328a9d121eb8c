"""The project's own exceptions: each message names the file, row or key at fault."""


class GazetuneError(Exception):
    """Base of errors that the command line reports as a message, without a traceback."""


class DataError(GazetuneError, ValueError):
    """An input table, DICOM file or cache that cannot be used."""


class CacheError(DataError):
    """A cache that is missing, incomplete or from another preprocessing version."""


class DivergedError(GazetuneError):
    """Training produced a NaN or infinite loss; the message says where and which term."""


class OutOfGpuMemory(GazetuneError):
    """A trial ran out of device memory; the message names the device, the batch and image
    size, the trial's GPU share and what to change."""
