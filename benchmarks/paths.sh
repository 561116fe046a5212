# Sourced by both_paths.sh and limits_sweep.sh: `hold PATH` sets the array `held` to the switches
# that run this machine's torch, oneDNN and MKL kernels on one instruction-set path (native: none;
# avx2: an AVX-512 machine held to its AVX2 code; which kernels honour them: isa_check.py).
hold() {
  case $1 in
    native) held=() ;;
    avx2) held=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    *) echo "unknown path $1 (native or avx2)" >&2; exit 2 ;;
  esac
}
