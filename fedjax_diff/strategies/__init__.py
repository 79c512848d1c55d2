"""Federated strategies: client-side transforms and upload compression."""

# `proximal`, `quantize` and `upload` are exported as modules (their main
# functions are `proximal.proximal` and `quantize.quantize`); a function of the
# same name here would shadow the submodule.
from fedjax_diff.strategies import build
from fedjax_diff.strategies import calibration
from fedjax_diff.strategies import proximal
from fedjax_diff.strategies import quantize
from fedjax_diff.strategies import upload
from fedjax_diff.strategies.calibration import Calibration
from fedjax_diff.strategies.proximal import ProximalState
from fedjax_diff.strategies.quantize import calibrate_scales
from fedjax_diff.strategies.quantize import compute_scales
from fedjax_diff.strategies.quantize import dequantize
from fedjax_diff.strategies.quantize import error_feedback_quantize
from fedjax_diff.strategies.quantize import init_residual
from fedjax_diff.strategies.quantize import pack
from fedjax_diff.strategies.quantize import QuantizationConfig
from fedjax_diff.strategies.quantize import quantize_dequantize
from fedjax_diff.strategies.quantize import unpack
from fedjax_diff.strategies.quantize import wire_bits
from fedjax_diff.strategies.quantize import wire_bytes
from fedjax_diff.strategies.upload import chain
from fedjax_diff.strategies.upload import error_feedback
from fedjax_diff.strategies.upload import quantizer
from fedjax_diff.strategies.upload import UploadContext
from fedjax_diff.strategies.upload import UploadTransform
