"""The 'Hello, world' of the LMDeploy InternVL3.5 guide, on vlmdeploy.

With no argument it runs the embedded default model on the bundled sample image; pass a checkpoint
directory (and optionally an image path or URL) to run another model:

    python examples/hello_world.py [MODEL_DIR [IMAGE]]
"""

import sys

from vlmdeploy import PytorchEngineConfig, pipeline
from vlmdeploy.vl import load_image

model = sys.argv[1] if len(sys.argv) > 1 else None  # None: the embedded default model
if len(sys.argv) > 2:
    image = load_image(sys.argv[2])
else:
    from vlmdeploy.assets import sample_image_path

    image = load_image(str(sample_image_path()))
pipe = pipeline(model, backend_config=PytorchEngineConfig(session_len=32768, tp=1))
response = pipe(("Describe this image.", image))
print(response.text)
