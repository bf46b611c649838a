/* KEFU_DEBUG is 1 in a KEFU_DEBUG=1 build (setup.py passes -DKEFU_DEBUG=1), 0 otherwise.
 * The .pyx modules read it as a C constant, so debug-only counting folds away in release. */
#ifndef KEFU_DEBUG_H
#define KEFU_DEBUG_H
#ifndef KEFU_DEBUG
#define KEFU_DEBUG 0
#endif
#endif
