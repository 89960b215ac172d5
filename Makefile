# Two commands set everything up on a fresh machine: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
MODEL := models/stories260K

.PHONY: run test install install-dev bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned, so pip takes the CPU wheel on disk and never pulls multi-GB CUDA builds. The extras
# (corpus cleaning, sweeps, Datasette, parquet) come too, so every command the README shows works.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	touch $@

# The web page test drives Debian's chromium (Playwright never downloads a browser here).
# llama-cpp-python (the reference the GGUF tests compare against) compiles llama.cpp once, CPU only and
# without the parts the tests do not use; pip's wheel cache keeps the build.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF
$(DEV_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e '.[dev]'
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium could not be installed: the web page test will be skipped"
	touch $@

# llama.cpp's own reference files, from the llama-cpp-python source distribution the tests compare against:
# the vocabularies with their tokenizer test vectors, its Hugging Face to GGUF converter (with its gguf-py), its
# converter of 2023's GGML/GGJT files and the models' chat templates it tests its tool-call parsers with.
# Without a network the tests that need them skip.
LLAMA_CPP_REF := .cache/llama.cpp
LLAMA_CPP_SRC := llama_cpp_python-0.3.36/vendor/llama.cpp
$(LLAMA_CPP_REF)/.done-with-ggml-converter: | $(PY)
	@mkdir -p $(LLAMA_CPP_REF)/sdist
	@if $(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(LLAMA_CPP_REF)/sdist; then \
		tar xzf $(LLAMA_CPP_REF)/sdist/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_CPP_REF) --strip-components 3 \
			--wildcards '$(LLAMA_CPP_SRC)/models/ggml-vocab-*' '$(LLAMA_CPP_SRC)/convert_hf_to_gguf.py' \
			'$(LLAMA_CPP_SRC)/convert_llama_ggml_to_gguf.py' \
			'$(LLAMA_CPP_SRC)/conversion/*' '$(LLAMA_CPP_SRC)/gguf-py/*' '$(LLAMA_CPP_SRC)/models/templates/*' && \
		rm -rf $(LLAMA_CPP_REF)/sdist && touch $@; \
	else echo "llama.cpp's reference files could not be downloaded: the tests that need them will be skipped"; fi

# The reference quantizers' own code for GPTQ and AWQ checkpoints (AutoGPTQ 0.7.1's GPTQ and QuantLinear packing,
# AutoAWQ 0.2.9's GEMM packing): their packages pull CUDA builds of torch, so the tests import just these
# PyTorch-only files from the downloaded distributions. Without a network the tests that need them skip.
QUANT_REF := .cache/quant-ref
$(QUANT_REF)/.done: | $(PY)
	@mkdir -p $(QUANT_REF)/dl
	@if $(PIP) download -q --no-deps auto-gptq==0.7.1 autoawq==0.2.9 -d $(QUANT_REF)/dl; then \
		$(PY) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in \
			z.namelist() if n.startswith(('auto_gptq/quantization/', 'auto_gptq/nn_modules/qlinear/qlinear_cuda'))])" \
			$(QUANT_REF)/dl/auto_gptq-0.7.1-*.whl $(QUANT_REF) && \
		tar xzf $(QUANT_REF)/dl/autoawq-0.2.9.tar.gz -C $(QUANT_REF) --strip-components 1 \
			autoawq-0.2.9/awq/utils/packing_utils.py autoawq-0.2.9/awq/modules/linear/gemm.py && \
		rm -rf $(QUANT_REF)/dl && touch $@; \
	else echo "AutoGPTQ and AutoAWQ could not be downloaded: the tests that need them will be skipped"; fi

install: $(STAMP)
install-dev: $(DEV_STAMP) $(LLAMA_CPP_REF)/.done-with-ggml-converter $(QUANT_REF)/.done

run: $(STAMP)
	$(VENV)/bin/camelid generate $(MODEL) --temperature 0 --max-new-tokens 200 ""

test: $(DEV_STAMP) $(LLAMA_CPP_REF)/.done-with-ggml-converter $(QUANT_REF)/.done
	$(VENV)/bin/ruff check camelid tests bench
	$(VENV)/bin/python -m pytest

bench: $(DEV_STAMP)
	$(VENV)/bin/python bench/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
