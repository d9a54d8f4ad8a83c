#!/usr/bin/env bash
# Prepares, on a machine WITH a package registry, what bench/gpu_check.sh needs on a GPU machine
# that has none: the Python packages the project needs and that machine's image lacks (as
# x86-64 / CPython 3.12 wheels in .whl/), and a copy of the real SNI sample and T5 vocabulary
# (in .gpu_data/, laid out as ../shared/data). Both folders are git-ignored; the GPU call names them in `carry`.
#
# The image already holds torch, transformers, tokenizers, sentencepiece, safetensors, numpy,
# pandas, pyarrow, pyyaml, jinja2, requests, aiohttp, protobuf, psutil (see the device notes).
# Ray's wheel alone (79 MB) is over the 64 MiB a call carries, so it is repacked: without the
# Java jars, RLlib, the dashboard's web UI and ray.llm (none used here), LZMA-compressed (pip
# reads any zip method Python's zipfile reads): ~31 MB. MLflow travels as mlflow-skinny, which
# has no SQLite store: gpu_check.sh logs to a file store.
#
#   bash bench/gpu_carry.sh        # ~2 minutes; then `du -sh .whl .gpu_data` is about 45 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SHARED=${SHARED:-../shared/data}

WHEELS=(
  ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 tensorboardx==2.6.5
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 cachetools==7.3.3 databricks-sdk==0.162.0
  google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 fastapi==0.165.0 starlette==1.10.0
  uvicorn==0.54.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 sqlparse==0.6.1
  typing-extensions==4.16.0  # the image has one; pydantic needs a recent one
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

rm -rf .whl .gpu_data
mkdir -p .whl .gpu_data/sni .gpu_data/tokenizer/t5
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"

"$PY" - .whl/ray-2.60.0-*.whl <<'EOF'
import base64, hashlib, os, sys, zipfile
src = sys.argv[1]
drop = ("ray/jars/", "ray/rllib/", "ray/dashboard/client/build/", "ray/llm/")
tmp = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    lines = []
    for info in zin.infolist():
        if info.filename.startswith(drop) or info.filename == record:
            continue
        data = zin.read(info)
        zout.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n", compress_type=zipfile.ZIP_LZMA)
os.replace(tmp, src)
EOF

if [ -d "$SHARED/sni" ]; then
  cp -r "$SHARED/sni/tasks" "$SHARED/sni/splits" .gpu_data/sni/
  cp "$SHARED/tokenizer/t5/spiece.model" .gpu_data/tokenizer/t5/
else
  echo "no $SHARED/sni here: gpu_check.sh will train on the synthetic suite" >&2
  rm -rf .gpu_data
fi
chmod -R u+w .whl .gpu_data 2>/dev/null || true
du -sh .whl .gpu_data 2>/dev/null
