/*
 * Stand-ins for the C entry points the TensorRT Python bindings link against
 * (libnvinfer, libnvonnxparser, libnvinfer_plugin). They let `import tensorrt_bindings`
 * succeed on a machine without TensorRT or a GPU, so tests/test_trt_api.py can check the
 * bindings' classes, enums and signatures. Every factory returns NULL: creating a Builder,
 * Runtime or parser fails (pybind11 raises TypeError "factory function returned nullptr"),
 * which proves these stubs, not real libraries, are what got loaded.
 *
 * Built three times per major version, with the soname the bindings' tensorrt.so needs:
 *   cc -shared -fPIC -o libnvinfer.so.10 nvinfer_stub.c -Wl,-soname,libnvinfer.so.10
 */
#include <stddef.h>
#include <stdint.h>

void *createInferBuilder_INTERNAL(void *logger, int32_t version) { (void)logger; (void)version; return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int32_t version) { (void)engine; (void)logger; (void)version; return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int32_t version) { (void)logger; (void)version; return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int32_t version) { (void)network; (void)logger; (void)version; return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int32_t version) { (void)refitter; (void)logger; (void)version; return NULL; }
void *getBuilderPluginRegistry(int32_t capability) { (void)capability; return NULL; }
int32_t getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *lib_namespace) { (void)logger; (void)lib_namespace; return 0; }
