#!/usr/bin/env bash
# GPU proof of Forge's llama.cpp serving path, and raw llama-cpp-python speed, on the lent H200.
# Runs ON the device machine from the repo root, in one call well under 10 minutes:
#     run tool: command "bash scripts/gpu_serving_bench.sh", carry [".whl"]
#
#   a. installs the carried wheels (.whl/*.whl) into /tmp/site: what the image lacks or has too old
#      (diskcache for llama-cpp-python; scikit-build-core + pyproject-metadata for the build; pydantic,
#      fastapi/starlette/uvicorn, openai/httpx2/jiter/sniffio/anyio for forge.serve and benchmarks/serving.py)
#   b. builds llama-cpp-python 0.3.36 from .whl/llama_cpp_python-0.3.36-slim.tar.xz (its sdist without
#      models/, docs/, .git and the other GPU backends) with CUDA for Hopper only (sm_90), in the
#      background, timed
#   c. meanwhile: a ~1.1B Llama from a config (random bf16 on the GPU, locally trained 32000-token BPE with
#      a chat template), HF -> GGUF F16 and two random r=16 peft LoRAs -> GGUF with the sdist's own
#      converters (forge.compress.llama_cpp_tools, BPE pre-tokenizer fallback "gpt-2"); after the build,
#      llama_model_quantize to Q5_K_M
#   d. a release folder as forge.serve.release reads it (model/base.gguf + tokenizer, adapters/{base,code})
#   e. raw llama-cpp-python on it with n_gpu_layers=-1: TTFT and decode tokens/s (greedy, 64-token prompt,
#      256 tokens, stream=True, median of 3), adapter switch time (median of 50), the HBM bandwidth bound
#      -> $OUT/gpu_raw.json
#   f. benchmarks/serving.py on that release, if the file exists -> $OUT/serving_gpu.json (native backtrace on
#      SIGSEGV via a preloaded handler; BENCH_PROBES=1 adds model-load probes -> $OUT/probes.log)
#   Skips: BENCH_SKIP_RAW=1 (e), BENCH_SKIP_E2=1 (e2), BENCH_PROBES=0; BENCH_PACK=1 packs the build (too big to carry)
#   BENCH_SERVING_ARGS: extra arguments to benchmarks/serving.py (default --breakdown)
#
# Rebuild the carried folder here (not on the device; ~12 MB):
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 (77 MB), then repack it without .git,
#     vendor/llama.cpp/{models,docs,media,tools/ui,benches,tests,examples}, examples, docker and the
#     ggml-{opencl,sycl,vulkan,metal,cann,musa,hip} backends as llama_cpp_python-0.3.36-slim.tar.xz (5 MB)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 [--platform manylinux...] -d .whl
#     diskcache==5.6.3 scikit-build-core==1.1.2 pyproject-metadata==0.12.1 pydantic==2.14.4 pydantic_core==2.50.5
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 fastapi==0.136.3
#     starlette==1.10.0 uvicorn==0.55.0 openai==3.60.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2
#     httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0
#   cublas-13.0-include.tar.xz: nvidia-cublas 13.0's headers, used only where the toolkit has no cuBLAS
#     (the H200 image's /usr/local/cuda has it)
# CPU smoke test here: BENCH_SKIP_BUILD=1 BENCH_TINY=1 BENCH_PY=.venv/bin/python bash scripts/gpu_serving_bench.sh
set -euo pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/forge-gpu-bench-out}"
WORK="${BENCH_WORK:-/tmp/forge-gpu-bench}"
SITE="${BENCH_SITE:-/tmp/site}"
PY="${BENCH_PY:-python3}"
TINY="${BENCH_TINY:-0}"
SKIP_BUILD="${BENCH_SKIP_BUILD:-0}"
BUDGET_S="${BENCH_BUDGET_S:-565}"            # the whole script stays under 9.5 minutes
BUILD_TIMEOUT_S="${BENCH_BUILD_TIMEOUT_S:-420}"
CUDA_ARCH="${BENCH_CUDA_ARCH:-90}"
EXTRA_CMAKE_ARGS="${BENCH_CMAKE_ARGS:-}"       # e.g. -DGGML_CUDA_FA=OFF for a leaner build
JOBS="$(nproc)"
VERSION=0.3.36
SDIST=".whl/llama_cpp_python-${VERSION}-slim.tar.xz"
SRC="$WORK/llama_cpp_python-${VERSION}"
START=$SECONDS

step() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - START)) "$*"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

mkdir -p "$OUT" "$WORK"
BUILD_PID=""
on_exit() {
    rc=$?
    if [[ -n "$BUILD_PID" ]] && kill -0 "$BUILD_PID" 2>/dev/null; then kill "$BUILD_PID" 2>/dev/null || true; fi
    [[ -f "$WORK/build.log" ]] && gzip -c "$WORK/build.log" >"$OUT/build.log.gz" 2>/dev/null || true
    for f in "$WORK"/prep.json "$WORK"/quantize.log; do [[ -f "$f" ]] && cp "$f" "$OUT/" || true; done
    step "exit $rc"
}
trap on_exit EXIT

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader \
    || echo "(no nvidia-smi)"
step "python: $($PY -c 'import sys; print(sys.version.split()[0], sys.executable)'), $JOBS cores"

# ---- a. carried wheels ------------------------------------------------------------------------------
if [[ "$SKIP_BUILD" != 1 ]]; then
    step "a. installing carried wheels into $SITE"
    mkdir -p "$SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
rm -rf "$SRC"
tar xJf "$SDIST" -C "$WORK"
# the sdist's own converters + gguf-py (forge.compress.llama_cpp_tools reads them from here)
export FORGE_LLAMA_CPP_TOOLS="$SRC/vendor/llama.cpp"
export PYTHONPATH="$REPO:$SRC/vendor/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}"

# ---- b. build llama-cpp-python with CUDA (background) -----------------------------------------------
find_cuda_libs() {
    # cuBLAS: the toolkit's, else the pip nvidia-cublas wheel's (torch's), with carried headers if needed
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
    CUDA_CMAKE=""
    if ! command -v nvcc >/dev/null && [[ -x "$CUDA_HOME/bin/nvcc" ]]; then export CUDACXX="$CUDA_HOME/bin/nvcc"; fi
    step "b. $(${CUDACXX:-nvcc} --version | tail -1), $(cmake --version | head -1), ninja $(ninja --version)"
    CUBLAS_LIB_DIR=""
    if ls "$CUDA_HOME"/lib64/libcublas.so >/dev/null 2>&1 && [[ -f "$CUDA_HOME/include/cublas_v2.h" ]]; then
        step "b. cuBLAS from the toolkit $CUDA_HOME"
    else
        local lib
        lib="$($PY - <<'EOF'
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in roots:
    for pat in ("nvidia/cu13/lib/libcublas.so.*", "nvidia/cublas/lib/libcublas.so.*"):
        hits = sorted(glob.glob(f"{r}/{pat}"))
        if hits:
            print(hits[0]); sys.exit()
EOF
)"
        if [[ -z "$lib" ]]; then
            step "b. no libcublas found (toolkit or pip nvidia-cublas): leaving it to CMake's FindCUDAToolkit"
            return 0
        fi
        CUBLAS_LIB_DIR="$(dirname "$lib")"
        local lt inc
        lt="$(ls "$CUBLAS_LIB_DIR"/libcublasLt.so.* | head -1)"
        inc="$(dirname "$CUBLAS_LIB_DIR")/include"
        if [[ ! -f "$inc/cublas_v2.h" ]]; then
            mkdir -p "$WORK/cublas" && tar xJf .whl/cublas-13.0-include.tar.xz -C "$WORK/cublas"
            inc="$WORK/cublas/include"
        fi
        step "b. cuBLAS from the pip wheel: $lib (headers $inc)"
        CUDA_CMAKE="-DCUDA_cublas_LIBRARY=$lib -DCUDA_cublasLt_LIBRARY=$lt -DCMAKE_CUDA_FLAGS=-I$inc -DCMAKE_CXX_FLAGS=-I$inc"
    fi
    local drv
    drv="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF; exit}' || true)"
    [[ -n "$drv" ]] || drv="$(ls /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* \
        "$CUDA_HOME"/lib64/stubs/libcuda.so 2>/dev/null | head -1 || true)"
    if [[ -n "$drv" ]]; then
        CUDA_CMAKE="$CUDA_CMAKE -DCUDA_cuda_driver_LIBRARY=$drv"
    else
        CUDA_CMAKE="$CUDA_CMAKE -DGGML_CUDA_NO_VMM=ON"
    fi
    step "b. libcuda: ${drv:-none (GGML_CUDA_NO_VMM=ON)}"
}

# a build a previous call sent back ($OUT/llama_cuda.tar.xz.part*), carried in .whl/: unpack it, skip the build
PREBUILT=0
if [[ "$SKIP_BUILD" != 1 ]] && compgen -G ".whl/llama_cuda.tar.xz.part*" >/dev/null; then
    step "b. unpacking the carried CUDA build of llama-cpp-python"
    cat .whl/llama_cuda.tar.xz.part* | xz -d -T0 | tar -x -C "$WORK"
    cp -r "$WORK"/llama_site/* "$SITE"/
    PREBUILT=1
    SKIP_BUILD=1
fi
if [[ "$SKIP_BUILD" != 1 ]]; then
    find_cuda_libs
    # --exclude-libs,ALL: the image's compiler (CXX=/opt/gcc/bin/g++) links libstdc++ statically into every .so
    # and, without this, exports it: libllama's std::ostream calls then bound to libggml-cuda.so's copy (another
    # locale state) and segfaulted in llama_model::print_info's std::stringstream while loading the model, in
    # some processes (benchmarks/serving.py every time, a bare Llama() not). Each library now keeps its own copy.
    export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DLLAVA_BUILD=OFF -DGGML_CUDA_NCCL=OFF \
-DGGML_CCACHE=OFF -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL $CUDA_CMAKE $EXTRA_CMAKE_ARGS"
    export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" SKBUILD_BUILD_DIR="$WORK/build"
    if [[ "${BENCH_CONFIGURE_ONLY:-0}" == 1 ]]; then
        # diagnostic: configure as the build would, compile the heaviest CUDA files once, and stop
        step "b. configure only"
        # shellcheck disable=SC2086
        cmake -S "$SRC" -B "$WORK/cfg" -G Ninja -DCMAKE_BUILD_TYPE=Release $CMAKE_ARGS >"$WORK/build.log" 2>&1 \
            || { tail -40 "$WORK/build.log"; exit 1; }
        grep -i -E "cuda|cublas|warning" "$WORK/build.log" | head -20 || true
        n_cu="$(ninja -C "$WORK/cfg" -t targets all | grep -c '\.cu\.o:' || true)"
        heavy="$(ninja -C "$WORK/cfg" -t targets all | grep -o '^[^:]*\(mmq-instance-q5_k\|fattn-mma-f16-instance-ncols1_1-ncols2_8\|/mmvq\|/mmf\)\.cu\.o' | tr '\n' ' ')"
        t=$SECONDS
        # shellcheck disable=SC2086
        ninja -C "$WORK/cfg" -j "$JOBS" $heavy >>"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
        step "b. $n_cu CUDA files to build; these 4 heavy ones took $((SECONDS - t))s together on $JOBS cores:"
        awk 'NR>1{printf "  %6.1fs %s\n", ($2-$1)/1000, $4}' "$WORK/cfg/.ninja_log" | sed 's|CMakeFiles/ggml-cuda.dir/||'
        exit 0
    fi
    # a warm machine keeps $WORK/build: CMake's cache would keep an option the new arguments leave out
    # (a -DGGML_CUDA_FA=OFF build served a later flash-attention run from the CPU), so other arguments, new build
    if [[ -d "$WORK/build" && "$(cat "$WORK/build.args" 2>/dev/null)" != "$CMAKE_ARGS" ]]; then
        step "b. CMAKE_ARGS changed since the kept build: starting from scratch"
        rm -rf "$WORK/build"
    fi
    echo "$CMAKE_ARGS" >"$WORK/build.args"
    step "b. building llama-cpp-python $VERSION (CMAKE_ARGS: $CMAKE_ARGS) in the background"
    BUILD_T0=$SECONDS
    (timeout "$BUILD_TIMEOUT_S" $PY -m pip install -v --no-build-isolation --no-deps --no-cache-dir --no-compile \
        --target "$WORK/llama_site" "$SRC" >"$WORK/build.log" 2>&1; echo $? >"$WORK/build.rc") &
    BUILD_PID=$!
    # at run time: the pip cuBLAS (no RPATH to it) and the toolkit's cudart
    export LD_LIBRARY_PATH="${CUBLAS_LIB_DIR:+$CUBLAS_LIB_DIR:}$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# ---- c. model, tokenizer, LoRAs, GGUF F16 (while the build runs) -------------------------------------
step "c. building the Llama + tokenizer + 2 LoRAs and converting them to GGUF"
cat >"$WORK/prep.py" <<'EOF'
import json, random, string, sys, time
from pathlib import Path

import torch

work, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
t0 = time.perf_counter()
times = {}
dev = "cuda" if torch.cuda.is_available() else "cpu"

# --- a byte-level BPE trained here on generated text (forge.train.base_model's special tokens + template)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, USER, ASSISTANT, SYSTEM, END = ("<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
vocab_size = 2048 if tiny else 32000
rng = random.Random(0)
sylls = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + [c + v + e for c in "bdklmst" for v in "aeiou"
                                                                   for e in "nrsx"]
lexicon = ["".join(rng.choice(sylls) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(60000)]
cum, acc = [], 0.0
for i in range(len(lexicon)):  # Zipf-like word frequencies (cumulative once: rng.choices is then cheap)
    acc += 1.0 / (i + 10)
    cum.append(acc)
def line() -> str:
    words = rng.choices(lexicon, cum_weights=cum, k=rng.randint(6, 18))
    if rng.random() < 0.3:
        words.append(str(rng.randint(0, 99999)))
    if rng.random() < 0.2:
        words = [f"def {words[0]}({words[1]}, {words[2]}):", "return", f"{words[3]}.{words[4]}[{rng.randint(0, 9)}]"]
    return " ".join(words).capitalize() + rng.choice(".,;:!?") + "\n"
texts = ["".join(line() for _ in range(50)) for _ in range(400 if tiny else 4000)]
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(texts, trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=[PAD, BOS, USER, ASSISTANT, SYSTEM, END], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=END, pad_token=PAD,
                              extra_special_tokens=[USER, ASSISTANT, SYSTEM], chat_template=TEMPLATE,
                              model_max_length=4096)
hf = work / "hf"
tok.save_pretrained(hf, save_jinja_files=False)  # the chat template inside tokenizer_config.json
assert "chat_template" in json.loads((hf / "tokenizer_config.json").read_text())
times["tokenizer_s"] = time.perf_counter() - t0
print(f"tokenizer: {len(tok)} tokens in {times['tokenizer_s']:.1f}s", flush=True)

# --- the model: random init in bf16 on the GPU
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

shape = (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2) if tiny else
         dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4))
config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     **shape)
t = time.perf_counter()
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device(dev):
    model = LlamaForCausalLM(config)
torch.set_default_dtype(torch.float32)
# Random weights must neither stop a 256-token greedy decode early nor emit lone non-ASCII bytes (the
# byte-level alphabet's tokens >= 0x80: llama-cpp-python holds incomplete UTF-8 back, and the stream then
# arrives in one burst). Those tokens' output rows are zero: their logit is 0 while the max over ~32000
# random logits is far above 0. The training text is ASCII, so every merged token is ASCII text.
never = [i for i in range(len(tok)) if i in tok.all_special_ids or not tok.decode([i]).isascii()]
with torch.no_grad():
    model.lm_head.weight[never] = 0
print(f"{len(never)} tokens never generated (special or non-ASCII bytes)", flush=True)
model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id, do_sample=False)
n_params = sum(p.numel() for p in model.parameters())
model.save_pretrained(hf)
times["model_s"] = time.perf_counter() - t
print(f"model: {n_params / 1e9:.3f}B params ({dev}, {next(model.parameters()).dtype}) saved in {times['model_s']:.1f}s",
      flush=True)

# --- two random LoRAs (r=16 on every projection, nonzero B)
from peft import LoraConfig, get_peft_model

t = time.perf_counter()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for i, name in enumerate(("base", "code")):
    torch.manual_seed(100 + i)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for pname, p in peft.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.01)
    peft.save_pretrained(work / f"peft_{name}")
    model = peft.unload()
times["loras_s"] = time.perf_counter() - t
del model
if dev == "cuda":
    torch.cuda.empty_cache()

# --- GGUF: llama.cpp's own converters from the sdist (the BPE pre-tokenizer falls back to "gpt-2")
from forge.compress.llama_cpp_tools import convert_hf_to_gguf, convert_lora_to_gguf

t = time.perf_counter()
convert_hf_to_gguf(hf, work / "f16.gguf", "f16", bpe_fallback="gpt-2")
times["convert_f16_s"] = time.perf_counter() - t
t = time.perf_counter()
for name in ("base", "code"):
    convert_lora_to_gguf(work / f"peft_{name}", hf, work / f"lora_{name}.gguf", "f16")
times["convert_loras_s"] = time.perf_counter() - t
prep = {"n_params": n_params, "vocab": len(tok), "config": shape, "device": dev, "times": times,
        "f16_bytes": (work / "f16.gguf").stat().st_size,
        "lora_bytes": {n: (work / f"lora_{n}.gguf").stat().st_size for n in ("base", "code")}}
(work / "prep.json").write_text(json.dumps(prep, indent=1))
print(json.dumps(prep), flush=True)
EOF
rm -rf "$WORK/hf" "$WORK"/peft_* "$WORK"/*.gguf
$PY "$WORK/prep.py" "$WORK" "$TINY"
step "c. model ready"

# ---- wait for the build -----------------------------------------------------------------------------
BUILD_S=null
if [[ "$SKIP_BUILD" != 1 ]]; then
    step "b. waiting for the build ($(grep -o -E '\[ *[0-9]+/[0-9]+\]' "$WORK/build.log" | tail -1) so far)"
    wait "$BUILD_PID" || true
    BUILD_PID=""
    BUILD_S=$((SECONDS - BUILD_T0))
    rc="$(cat "$WORK/build.rc" 2>/dev/null || echo 1)"
    step "b. build finished rc=$rc in ${BUILD_S}s ($(grep -o -E '\[ *[0-9]+/[0-9]+\]' "$WORK/build.log" | tail -1))"
    if [[ "$rc" != 0 ]]; then
        grep -n -i -E "error|fatal" "$WORK/build.log" | head -30 || true
        tail -40 "$WORK/build.log"
        exit 1
    fi
    cp -r "$WORK"/llama_site/* "$SITE"/
    ls -la "$SITE/llama_cpp/lib"
    # send the build back (<= 3 parts of 15 MB): carried in .whl/, a later call skips the build. Off unless
    # BENCH_PACK=1: the sm_90 build is ~205 MB (libggml-cuda.so 62 MB three times: pip --target writes no
    # symlinks) and its fatbins do not compress (16 parts of 15 MB on 2026-12-04), over the 64 MiB carry limit
    if [[ "${BENCH_PACK:-0}" == 1 ]]; then
        (tar -C "$WORK" -c llama_site | xz -T0 -6 | split -b 15M -d - "$WORK/llama_cuda.tar.xz.part") || true
        n_parts="$(ls "$WORK"/llama_cuda.tar.xz.part* 2>/dev/null | wc -l)"
        if ((n_parts > 0 && n_parts <= 3)); then cp "$WORK"/llama_cuda.tar.xz.part* "$OUT"/; fi
        step "b. CUDA build packed: $n_parts part(s) of <= 15 MB"
    fi
fi
if ((PREBUILT)); then
    export LD_LIBRARY_PATH="${CUDA_HOME:-/usr/local/cuda}/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
$PY -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())"

step "c. quantizing to Q5_K_M"
$PY - "$WORK" "$JOBS" <<'EOF'
import sys, time
from pathlib import Path
from forge.compress.llama_cpp_tools import quant_fallbacks, quantize

work = Path(sys.argv[1])
lines: list[str] = []
t = time.perf_counter()
quantize(work / "f16.gguf", work / "q5_k_m.gguf", "q5_k_m", n_threads=int(sys.argv[2]), log_lines=lines)
(work / "quantize.log").write_text("\n".join(lines))
(work / "quantize_s").write_text(f"{time.perf_counter() - t:.2f}")
print(f"quantized in {time.perf_counter() - t:.1f}s: {(work / 'q5_k_m.gguf').stat().st_size / 1e6:.1f} MB, "
      f"fallbacks {quant_fallbacks(lines)}")
EOF

# ---- d. the release folder --------------------------------------------------------------------------
step "d. assembling the release folder"
REL="$WORK/release"
rm -rf "$REL"
$PY - "$WORK" "$REL" <<'EOF'
import json, shutil, sys
from pathlib import Path
from forge.serve.release import ADAPTERS_DIR, BASE_GGUF, MODEL_DIR, Release, write_release_json

work, rel = Path(sys.argv[1]), Path(sys.argv[2])
(rel / MODEL_DIR).mkdir(parents=True)
(rel / ADAPTERS_DIR).mkdir()
shutil.move(work / "q5_k_m.gguf", rel / BASE_GGUF)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja", "config.json"):
    if (work / "hf" / name).is_file():
        shutil.copy2(work / "hf" / name, rel / MODEL_DIR / name)
for name in ("base", "code"):
    shutil.copy2(work / f"lora_{name}.gguf", rel / ADAPTERS_DIR / f"{name}.gguf")
write_release_json(rel, {"name": "gpu-bench", "adapters": {"base": f"{ADAPTERS_DIR}/base.gguf",
                                                           "code": f"{ADAPTERS_DIR}/code.gguf"}})
r = Release.load(rel)
print(f"release {r.name}: options {r.options}, files {sorted(json.loads((rel / 'release.json').read_text())['files'])}")
EOF

# ---- e. raw llama-cpp-python --------------------------------------------------------------------------
step "e. raw llama-cpp-python benchmark"
cat >"$WORK/bench.py" <<'EOF'
import ctypes, json, os, random, statistics, subprocess, sys, time
from pathlib import Path

import llama_cpp
from llama_cpp import Llama

rel, out = Path(sys.argv[1]), Path(sys.argv[2])
extra = json.loads(sys.argv[3])
HBM_BPS = 4.8e12  # H200 HBM3e, vendor datasheet
PROMPT, GEN, REPEATS, SWITCHES = 64, 256, 3, 50
gguf = rel / "model" / "base.gguf"
res = dict(extra)


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"


res["gpu"] = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                 "--format=csv,noheader"])
res["llama_cpp_python"] = llama_cpp.__version__
res["gpu_offload_supported"] = bool(llama_cpp.llama_supports_gpu_offload())
res["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace")

# weight bytes a decode step reads: every tensor but the embedding table (a row lookup)
import gguf as gguf_py

reader = gguf_py.GGUFReader(str(gguf))
types, total, embd = {}, 0, 0
for t in reader.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    total += int(t.n_bytes)
    if t.name == "token_embd.weight":
        embd = int(t.n_bytes)
per_token = total - embd
res["gguf"] = {"file_bytes": gguf.stat().st_size, "tensor_bytes": total, "token_embd_bytes": embd,
               "weight_bytes_per_token": per_token, "tensor_types": types}
res["bandwidth_bound"] = {"hbm_bytes_per_s": HBM_BPS, "bytes_per_token": per_token,
                         "bound_tokens_per_s": HBM_BPS / per_token}

rng = random.Random(0)


def load(flash_attn):
    t = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_gpu_layers=-1, n_ctx=1024, n_batch=512, flash_attn=flash_attn,
                seed=0, verbose=False)
    return llm, time.perf_counter() - t


def completion(llm, prompt):
    """One greedy stream: (ttft_s, decode tokens/s, generated, finish)."""
    llm.reset()  # no prefix reuse between repeats: every run pays the prompt
    t0 = time.perf_counter()
    first = last = None
    finish = None
    chunks, gaps = 0, []
    for chunk in llm.create_completion(prompt, max_tokens=GEN, temperature=0.0, stream=True):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        first = first or now
        last = now
        chunks += 1
        finish = chunk["choices"][0]["finish_reason"] or finish
    # finish "length": exactly max_tokens were generated (else: the last sampled token is never evaluated)
    generated = GEN if finish == "length" else llm.n_tokens - len(prompt) + 1
    return {"ttft_s": first - t0, "decode_tok_s": (generated - 1) / (last - first), "generated": generated,
            "e2e_tok_s": generated / (last - t0), "finish": finish, "chunks": chunks,
            "max_gap_ms": max(gaps) * 1000 if gaps else None}


def eval_loop(llm, prompt):
    """The floor under create_completion: llm.eval one token at a time + numpy argmax (no sampler chain,
    no detokenizing)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(GEN - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return (GEN - 1) / (time.perf_counter() - t)


def series(llm, prompt, label):
    completion(llm, prompt)  # warm-up (kernels, CUDA graphs)
    runs = [completion(llm, prompt) for _ in range(REPEATS)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "decode_tok_s", "e2e_tok_s")}
    print(f"{label}: ttft {med['ttft_s'] * 1000:.2f} ms, decode {med['decode_tok_s']:.1f} tok/s "
          f"(runs {[round(r['decode_tok_s'], 1) for r in runs]}, generated {[r['generated'] for r in runs]}, "
          f"chunks {[r['chunks'] for r in runs]}, max gap ms {[round(r['max_gap_ms'], 2) for r in runs]}, "
          f"finish {[r['finish'] for r in runs]})", flush=True)
    return {"median": med, "runs": runs}


def adapter_array(handles):
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(len(handles), 1))(*handles)
    scales = (ctypes.c_float * max(len(handles), 1))(*([1.0] * len(handles)))
    return arr, scales


def set_adapters(llm, handles):
    arr, scales = adapter_array(handles)
    rc = llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(handles), scales)
    if rc != 0:
        raise RuntimeError(f"llama_set_adapters_lora rc {rc}")
    llm.reset()


llm, load_s = load(False)
n_vocab = llm.n_vocab()
prompt = [rng.randrange(16, n_vocab) for _ in range(PROMPT)]
res["setup"] = {"n_gpu_layers": -1, "n_ctx": 1024, "n_batch": 512, "prompt_tokens": PROMPT, "max_tokens": GEN,
                "repeats": REPEATS, "temperature": 0.0, "stream": True, "n_vocab": n_vocab}
res["load_s"] = load_s
res["no_adapter"] = series(llm, prompt, "no adapter, flash_attn off")
res["eval_loop_tok_s"] = statistics.median(eval_loop(llm, prompt) for _ in range(REPEATS))
print(f"eval loop (no create_completion): {res['eval_loop_tok_s']:.1f} tok/s", flush=True)

# adapters: load both, switch 50 times (set + reset), then decode with one active
t = time.perf_counter()
handles = {}
for name in ("base", "code"):
    h = llama_cpp.llama_adapter_lora_init(llm.model, str(rel / "adapters" / f"{name}.gguf").encode())
    if not h:
        raise RuntimeError(f"llama_adapter_lora_init failed for {name}")
    handles[name] = h
res["adapter_load_s"] = time.perf_counter() - t
switch_ms = []
for i in range(SWITCHES):
    h = handles["base" if i % 2 == 0 else "code"]
    t = time.perf_counter()
    set_adapters(llm, [h])
    switch_ms.append((time.perf_counter() - t) * 1000)
res["switch_ms"] = {"median": statistics.median(switch_ms), "p90": sorted(switch_ms)[int(0.9 * SWITCHES) - 1],
                    "max": max(switch_ms), "n": SWITCHES, "what": "llama_set_adapters_lora + llm.reset()"}
print(f"adapter switch: median {res['switch_ms']['median']:.3f} ms, max {res['switch_ms']['max']:.3f} ms", flush=True)
set_adapters(llm, [handles["code"]])
res["with_adapter"] = series(llm, prompt, "adapter 'code' active, flash_attn off")
# first request right after a switch (includes whatever the switch defers to the next decode)
ttft_after = []
for i in range(6):
    set_adapters(llm, [handles["base" if i % 2 == 0 else "code"]])
    ttft_after.append(completion(llm, prompt)["ttft_s"])
res["ttft_after_switch_s_median"] = statistics.median(ttft_after)
set_adapters(llm, [])
for h in handles.values():
    llama_cpp.llama_adapter_lora_free(h)
llm.close()

llm, _ = load(True)
res["flash_attn_on"] = series(llm, prompt, "no adapter, flash_attn on")
llm.close()

best = max(res["no_adapter"]["median"]["decode_tok_s"], res["flash_attn_on"]["median"]["decode_tok_s"])
bw = res["bandwidth_bound"]
bw["achieved_fraction_flash_off"] = res["no_adapter"]["median"]["decode_tok_s"] / bw["bound_tokens_per_s"]
bw["achieved_fraction_best"] = best / bw["bound_tokens_per_s"]
bw["achieved_fraction_eval_loop"] = res["eval_loop_tok_s"] / bw["bound_tokens_per_s"]
bw["achieved_bytes_per_s_best"] = best * per_token
print(f"bandwidth bound: {per_token / 1e6:.1f} MB/token -> {bw['bound_tokens_per_s']:.0f} tok/s at 4.8 TB/s; "
      f"achieved {bw['achieved_fraction_flash_off']:.1%} (flash off), {bw['achieved_fraction_best']:.1%} (best), "
      f"{bw['achieved_fraction_eval_loop']:.1%} (eval loop)", flush=True)
out.write_text(json.dumps(res, indent=1))
print(f"wrote {out}")
EOF
QUANT_S="$(cat "$WORK/quantize_s" 2>/dev/null || echo null)"
[[ "${BENCH_SKIP_RAW:-0}" == 1 ]] && step "e. skipped (BENCH_SKIP_RAW=1)" || $PY "$WORK/bench.py" "$REL" "$OUT/gpu_raw.json" \
    "{\"build_s\": $BUILD_S, \"quantize_s\": $QUANT_S, \"cmake_args\": \"${CMAKE_ARGS:-}\", \"tiny\": $TINY, \"prep\": $(cat "$WORK/prep.json")}"

# ---- e2. Forge's engine alone, in its own process (what crashed earlier: pin it down before f) -----------
step "e2. Forge engine alone (1 worker, n_gpu_layers -1), own process"
[[ "${BENCH_SKIP_E2:-0}" == 1 ]] && E2_T=1 || E2_T=120  # BENCH_SKIP_E2=1: a 1 s timeout, i.e. skipped
timeout "$E2_T" $PY -X faulthandler - "$REL" <<'EOF' || step "e2. engine probe exited $? (124: skipped)"
import sys, time
from pathlib import Path

from forge.serve.engine import Engine, EngineSettings, GenParams
from forge.serve.release import Release

print("before the engine: torch imported:", "torch" in sys.modules, flush=True)
rel = Release.load(Path(sys.argv[1]))
for flash in (False, True):
    t = time.perf_counter()
    e = Engine(rel, EngineSettings(n_gpu_layers=-1, workers=1, n_threads=4, flash_attn=flash, verbose=False))
    print(f"flash_attn={flash}: engine loaded in {time.perf_counter() - t:.2f}s, options {e.options}, "
          f"torch imported: {'torch' in sys.modules}", flush=True)
    for option in e.options:
        c = e.generate([{"role": "user", "content": "Say something."}], option, GenParams(max_tokens=128,
                                                                                           ignore_eos=True))
        print(f"  {option}: {c.usage.completion_tokens} tokens, ttft {c.usage.first_token_ms:.1f} ms, "
              f"{c.usage.tokens_per_s:.1f} tok/s, switch {c.usage.switch_ms:.3f} ms", flush=True)
    e.close()
print("engine probe ok", flush=True)
EOF

# ---- f. the serving benchmark (benchmarks/serving.py), then load probes that pin down the earlier SIGSEGV ----
# A native backtrace on SIGSEGV/SIGBUS (LD_PRELOAD; -X faulthandler still prints the Python stack first and then
# re-raises into it): llama.cpp frames as lib(+offset), resolved below against the libraries' dynamic symbols.
SEGV_SO=""
if command -v gcc >/dev/null; then
    cat >"$WORK/segv_bt.c" <<'CEOF'
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
static void handler(int sig, siginfo_t *si, void *uc) {
    void *bt[128];
    char msg[32];
    int n = backtrace(bt, 128);
    const char *h = "\n*** native backtrace (segv_bt) ***\n";
    write(2, h, strlen(h));
    backtrace_symbols_fd(bt, n, 2);
    unsigned long a = (unsigned long)si->si_addr;
    char *p = msg + sizeof(msg) - 1;
    *p = 0;
    do { *--p = "0123456789abcdef"[a & 15]; a >>= 4; } while (a);
    write(2, "fault address 0x", 16); write(2, p, strlen(p)); write(2, "\n", 1);
    signal(sig, SIG_DFL);
    raise(sig);
}
__attribute__((constructor)) static void init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
}
CEOF
    gcc -shared -fPIC -O1 -o "$WORK/libsegv_bt.so" "$WORK/segv_bt.c" && SEGV_SO="$WORK/libsegv_bt.so"
fi
resolve_bt() {  # frames lib(+0xOFF) -> nearest dynamic symbol of that library
    $PY - "$1" <<'PYEOF' || true
import bisect, re, subprocess, sys
syms = {}
def table(lib):
    if lib not in syms:
        rows = []
        try:
            out = subprocess.run(["nm", "-D", "-C", "--defined-only", lib], capture_output=True, text=True).stdout
            for line in out.splitlines():
                parts = line.split(" ", 2)
                if len(parts) == 3 and parts[1] in "TtWw":
                    rows.append((int(parts[0], 16), parts[2]))
        except Exception:
            pass
        rows.sort()
        syms[lib] = rows
    return syms[lib]
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"(\S+\.so[\w.]*)\(\+0x([0-9a-f]+)\)", line.strip())
    if m and re.search(r"llama|ggml", m.group(1)):
        rows = table(m.group(1))
        off = int(m.group(2), 16)
        k = bisect.bisect_right([r[0] for r in rows], off) - 1
        name = f"{rows[k][1]}+0x{off - rows[k][0]:x}" if k >= 0 else "?"
        print(f"  {m.group(1).rsplit('/', 1)[-1]}+0x{off:x}  ~ {name}")
    elif "(" in line and ("llama" in line or "ggml" in line) and "[0x" in line:
        print("  " + line.strip())
PYEOF
}
probe() {  # probe NAME TIMEOUT CMD...: run with the native backtrace, full output in $OUT/probes.log
    local name="$1" t="$2" rc
    shift 2
    step "probe $name"
    set +e
    LD_PRELOAD="$SEGV_SO" timeout "$t" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    set -e
    { echo "===== $name (rc $rc): $*"; cat "$WORK/$name.log"; } >>"$OUT/probes.log"
    if ((rc != 0)); then
        grep -v -E "^(llama_model_loader|print_info|load|llama_context|llama_kv_cache|llama_adapter_lora_init_impl|load_tensors|graph_reserve|sched_reserve|set_abort_callback|llama_model_load_from_file_impl|init_tokenizer|create_memory|llama_params_fit|common_|\s*$)" \
            "$WORK/$name.log" | tail -45
        step "probe $name: rc $rc; llama.cpp frames:"
        resolve_bt "$WORK/$name.log"
    else
        grep -E "PROBE" "$WORK/$name.log" || tail -3 "$WORK/$name.log"
    fi
}
step "f. how the libraries get their C++ runtime (host compiler $(command -v g++ || true); ${CXX:-})"
( g++ --version | head -1; ls -la /opt/gcc/lib64/libstdc++* 2>/dev/null | head -5
  for l in "$SITE"/llama_cpp/lib/libllama.so "$SITE"/llama_cpp/lib/libggml-cuda.so "$SITE"/llama_cpp/lib/libggml-base.so; do
      echo "$(basename "$l"): NEEDED $(readelf -d "$l" | awk '/NEEDED/{printf "%s ", $NF}')"
      echo "   exported std:: symbols: $(nm -D --defined-only "$l" | grep -c ' _ZNS\| _ZNKS\| _ZSt' || true)," \
           "_M_insert<long>: $(nm -D --defined-only "$l" | grep -c '_ZNSo9_M_insertIlEERSoT_' || true)"
  done ) 2>&1 || true
# BENCH_FLASH=0: without flash attention (a build with -DGGML_CUDA_FA=OFF compiles in about half the time)
[[ "${BENCH_FLASH:-1}" == 1 ]] && FLASH="--flash-attn" || FLASH=""
SERVING_ARGS="${BENCH_SERVING_ARGS---breakdown}"  # extra benchmarks/serving.py arguments ("" for none)
if [[ -f benchmarks/serving.py ]]; then
    T_LEFT="$(left)"
    [[ "${BENCH_PROBES:-0}" == 1 ]] && T_SERVE=$((T_LEFT - 75)) || T_SERVE=$((T_LEFT - 10))  # probes: ~60 s
    ((T_SERVE > 300)) && T_SERVE=300
    if [[ -n "${BENCH_SERVING_TIMEOUT_S:-}" ]] && ((BENCH_SERVING_TIMEOUT_S < T_SERVE)); then
        T_SERVE="$BENCH_SERVING_TIMEOUT_S"
    fi
    if ((T_SERVE > 20)); then
        step "f. benchmarks/serving.py (timeout ${T_SERVE}s, llama.cpp quiet)"
        set +e
        LD_PRELOAD="$SEGV_SO" timeout "$T_SERVE" $PY -X faulthandler benchmarks/serving.py --release "$REL" \
            --n-gpu-layers -1 $FLASH --threads 4 --workers 4 --tokens 256 --repeats 5 --clients 8 \
            $SERVING_ARGS --json "$OUT/serving_gpu.json" 2>&1 | tee "$WORK/serving.log"
        rc=${PIPESTATUS[0]}
        set -e
        if ((rc != 0)); then
            step "f. benchmarks/serving.py exited $rc; llama.cpp frames:"
            resolve_bt "$WORK/serving.log"
            STDCXX="$(ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/{print $NF; exit}')"
            T_LEFT="$(left)"
            if [[ -n "$STDCXX" ]] && ((T_LEFT > 60)); then
                step "f. again with $STDCXX preloaded (its definitions first in the global scope; timeout $((T_LEFT - 10))s)"
                set +e
                LD_PRELOAD="$STDCXX${SEGV_SO:+ $SEGV_SO}" timeout $((T_LEFT - 10)) $PY -X faulthandler \
                    benchmarks/serving.py --release "$REL" --n-gpu-layers -1 $FLASH --threads 4 --workers 4 \
                    --tokens 256 --repeats 5 --clients 8 --json "$OUT/serving_gpu.json" 2>&1 | tee "$WORK/serving2.log"
                rc=${PIPESTATUS[0]}
                set -e
                ((rc == 0)) || { step "f. exited $rc again; llama.cpp frames:"; resolve_bt "$WORK/serving2.log"; }
            fi
        fi
    else
        step "f. skipped benchmarks/serving.py: only ${T_LEFT}s of the budget left"
    fi
else
    step "f. no benchmarks/serving.py yet: skipped"
fi
if [[ "${BENCH_PROBES:-0}" == 1 ]] && (($(left) > 30)); then
    # what differed between the crashing run (serving.py) and the working ones (raw bench, e2): llama.cpp's
    # verbose log, and serving.py's imports (forge.config, yaml, ...). Each a fresh process, model load only.
    GG="$REL/model/base.gguf"
    probe p1_llama_quiet 40 $PY -X faulthandler -c "import sys; from llama_cpp import Llama; Llama(model_path=sys.argv[1], n_gpu_layers=-1, verbose=False); print('PROBE p1 ok')" "$GG"
    probe p2_llama_verbose 40 $PY -X faulthandler -c "import sys; from llama_cpp import Llama; Llama(model_path=sys.argv[1], n_gpu_layers=-1, verbose=True); print('PROBE p2 ok')" "$GG"
    probe p3_engine_verbose 40 $PY -X faulthandler -c "import sys; from pathlib import Path; from forge.serve.engine import Engine, EngineSettings; from forge.serve.release import Release; e = Engine(Release.load(Path(sys.argv[1])), EngineSettings(n_gpu_layers=-1, n_threads=4, flash_attn=True, verbose=True)); e.close(); print('PROBE p3 ok')" "$REL"
    probe p4_serving_verbose 60 $PY -X faulthandler benchmarks/serving.py --release "$REL" --n-gpu-layers -1 --flash-attn --verbose --threads 4 --workers 1 --tokens 32 --repeats 1 --switches 20 --no-http
fi
step "done"
