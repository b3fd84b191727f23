__version__ = "0.1.0"
# Written into adapter_config.json's "peft_version": a PEP 440 version that orders after the PEFT release whose
# checkpoint format we write (0.21.2), with a local label saying who wrote it.
PEFT_FORMAT_VERSION = "0.21.2"
PEFT_VERSION_STRING = f"{PEFT_FORMAT_VERSION}+peft.kernels.{__version__}"
