// XLA FFI handlers running 2-D convolutions on oneDNN (CPU; float32, or bfloat16 where
// SdlDnnlBf16 says this CPU has fast bfloat16 kernels), grouped ones (depthwise included)
// too. All three operands of a call share one dtype.
//
// Built and loaded by sdl_jax/cpu/dnnl.py, against oneDNN 2.x or 3.x (their primitive
// descriptors are built differently; DNNL_VERSION_MAJOR picks). Layouts are the models':
// activations NHWC, weights HWIO ([kh, kw, C / groups, O], output channel o in group
// o / (O / groups)), row-major (XLA passes custom-call operands in their default layout).
// Three handlers, one per direction of y = conv(x, w) with strides (sh, sw) and padding
// ((pt, pb), (pl, pr)) and ``groups`` feature groups:
//   SdlDnnlConvFwd        (x, w)  -> y
//   SdlDnnlConvBwdData    (dy, w) -> dx   (dx's shape is the result buffer's)
//   SdlDnnlConvBwdWeights (x, dy) -> dw   (dw's shape is the result buffer's)
// and one that is not oneDNN's: SdlStored (x) -> x, the identity, called with its result
// aliasing its operand (see it below).
// Attribute ``blocked`` (weight gradient only): oneDNN picks the layout of x and dy too,
// and they are reordered to it; otherwise oneDNN keeps the activations in NHWC (no
// reorders of the large tensors). It picks the weights' layout; weights are reordered
// from or to HWIO around the primitive. Primitives
// are built once per shape and cached, and run with a scratchpad of the calling thread's
// (scratchpad_mode::user): XLA runs one program's devices on several threads of its pool at
// once, and with the library's own scratchpad a primitive may run only on the thread that
// built it (two devices running the same weight gradient at once deadlocked in it).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Prim {
  dnnl::primitive prim;
  memory::desc a_want, b_want, out_want;  // what the primitive takes
  memory::desc a_user, b_user, out_user;  // NHWC / HWIO as XLA holds them
  memory::desc scratch;                   // the primitive's scratchpad
  std::string impl;                       // oneDNN's name of the kernel (``ref`` is slow)
};

// (kind, n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr, groups, bf16, blocked)
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, bool, bool>;

// Builds the primitive for ``key``; throws dnnl::error where oneDNN has none for it.
Prim Make(const Key& key) {
  auto [kind, n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr, g, bf16, blocked] = key;
  const dt type = bf16 ? dt::bf16 : dt::f32;
  memory::dims src = {n, c, h, w}, dst = {n, o, ho, wo};
  // Grouped weights are (g, O / g, C / g, kh, kw) to oneDNN; HWIO's memory order is then
  // h, w, i, g, o: the tag hwigo.
  memory::dims wts = g == 1 ? memory::dims{o, c, kh, kw}
                            : memory::dims{g, o / g, c / g, kh, kw};
  memory::dims strides = {sh, sw}, pad_l = {pt, pl}, pad_r = {pb, pr};
  auto src_u = memory::desc(src, type, tag::nhwc);
  auto dst_u = memory::desc(dst, type, tag::nhwc);
  auto wts_u = memory::desc(wts, type, g == 1 ? tag::hwio : tag::hwigo);
  auto wts_any = memory::desc(wts, type, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto direct = dnnl::algorithm::convolution_direct;
#if DNNL_VERSION_MAJOR >= 3
  auto fwd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, direct, src_u, wts_any, dst_u, strides,
      pad_l, pad_r, attr);
#else
  auto fwd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, direct, src_u,
                                      wts_any, dst_u, strides, pad_l, pad_r),
      attr, Engine());
#endif
  Prim p;
  if (kind == kFwd) {
    p.prim = dnnl::convolution_forward(fwd);
    p.scratch = fwd.scratchpad_desc();
    p.impl = fwd.impl_info_str();
    p.a_want = fwd.src_desc(); p.b_want = fwd.weights_desc(); p.out_want = fwd.dst_desc();
    p.a_user = src_u; p.b_user = wts_u; p.out_user = dst_u;
  } else if (kind == kBwdData) {
#if DNNL_VERSION_MAJOR >= 3
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), direct, src_u, wts_any, dst_u, strides, pad_l, pad_r, fwd, attr);
#else
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(direct, src_u, wts_any, dst_u, strides, pad_l,
                                              pad_r),
        attr, Engine(), fwd);
#endif
    p.prim = dnnl::convolution_backward_data(pd);
    p.scratch = pd.scratchpad_desc();
    p.impl = pd.impl_info_str();
    p.a_want = pd.diff_dst_desc(); p.b_want = pd.weights_desc(); p.out_want = pd.diff_src_desc();
    p.a_user = dst_u; p.b_user = wts_u; p.out_user = src_u;
  } else {
    // ``blocked``: oneDNN picks the activations' layout too (its blocked one), and x and dy
    // are reordered to it on every call; the JIT weight-gradient kernel ran up to 1.36x
    // as fast on it, reorders included (docs/performance.md, 2026-12-03).
    auto src_w = blocked ? memory::desc(src, type, tag::any) : src_u;
    auto dst_w = blocked ? memory::desc(dst, type, tag::any) : dst_u;
#if DNNL_VERSION_MAJOR >= 3
    auto hint = blocked ? dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, direct, src_w, wts_any, dst_w, strides,
        pad_l, pad_r, attr) : fwd;
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), direct, src_w, wts_any, dst_w, strides, pad_l, pad_r, hint, attr);
#else
    auto hint = blocked ? dnnl::convolution_forward::primitive_desc(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, direct, src_w,
                                        wts_any, dst_w, strides, pad_l, pad_r),
        attr, Engine()) : fwd;
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(direct, src_w, wts_any, dst_w, strides,
                                                 pad_l, pad_r),
        attr, Engine(), hint);
#endif
    p.prim = dnnl::convolution_backward_weights(pd);
    p.scratch = pd.scratchpad_desc();
    p.impl = pd.impl_info_str();
    p.a_want = pd.src_desc(); p.b_want = pd.diff_dst_desc(); p.out_want = pd.diff_weights_desc();
    p.a_user = src_u; p.b_user = dst_u; p.out_user = wts_u;
  }
  return p;
}

Prim& Get(const Key& key) {
  static std::map<Key, Prim> cache;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  return cache.emplace(key, Make(key)).first->second;
}

// The calling thread's scratchpad, grown to the largest a primitive has asked of it; kept
// between calls so large reduction buffers are not mapped afresh each step.
void* Scratch(size_t bytes) {
  struct Free { void operator()(void* q) const { std::free(q); } };
  thread_local std::unique_ptr<void, Free> buffer;
  thread_local size_t size = 0;
  if (bytes > size) {
    size_t rounded = (bytes + 63) / 64 * 64;
    buffer.reset(std::aligned_alloc(64, rounded));
    if (!buffer) { size = 0; throw std::bad_alloc(); }
    size = rounded;
  }
  return buffer.get();
}

memory Input(const memory::desc& want, const memory::desc& user, void* data,
             dnnl::stream& stream) {
  memory m(user, Engine(), data);
  if (want == user) return m;
  memory converted(want, Engine());
  dnnl::reorder(m, converted).execute(stream, m, converted);
  return converted;
}

ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> out, int64_t sh, int64_t sw, int64_t pt,
               int64_t pb, int64_t pl, int64_t pr, int64_t groups, int64_t blocked) {
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 4 || bd.size() != 4 || od.size() != 4)
    return ffi::Error::InvalidArgument("sdl_jax dnnl convolution: operands must be 4-D");
  const auto type = a.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16)
      || b.element_type() != type || out->element_type() != type)
    return ffi::Error::InvalidArgument(
        "sdl_jax dnnl convolution: operands must all be float32 or all bfloat16");
  int64_t n, h, w, c, o, kh, kw, ho, wo;
  if (kind == kFwd) {  // x [n, h, w, c], w [kh, kw, c, o] -> y [n, ho, wo, o]
    n = ad[0]; h = ad[1]; w = ad[2]; c = ad[3]; kh = bd[0]; kw = bd[1]; o = bd[3];
    ho = od[1]; wo = od[2];
  } else if (kind == kBwdData) {  // dy [n, ho, wo, o], w -> dx [n, h, w, c]
    n = ad[0]; ho = ad[1]; wo = ad[2]; o = ad[3]; kh = bd[0]; kw = bd[1]; c = od[3];
    h = od[1]; w = od[2];
  } else {  // x [n, h, w, c], dy [n, ho, wo, o] -> dw [kh, kw, c, o]
    n = ad[0]; h = ad[1]; w = ad[2]; c = ad[3]; ho = bd[1]; wo = bd[2]; o = bd[3];
    kh = od[0]; kw = od[1];
  }
  if (groups < 1 || c % groups || o % groups)
    return ffi::Error::InvalidArgument("sdl_jax dnnl convolution: groups must divide C and O");
  try {
    Prim& p = Get(Key{kind, n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pb, pl, pr, groups,
                      type == ffi::DataType::BF16, kind == kBwdWeights && blocked != 0});
    dnnl::stream stream(Engine());
    memory am = Input(p.a_want, p.a_user, a.untyped_data(), stream);
    memory bm = Input(p.b_want, p.b_user, b.untyped_data(), stream);
    memory user_out(p.out_user, Engine(), out->untyped_data());
    bool direct = p.out_want == p.out_user;
    memory om = direct ? user_out : memory(p.out_want, Engine());
    memory scratch(p.scratch, Engine(), Scratch(p.scratch.get_size()));
    if (kind == kFwd) {
      p.prim.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, om},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == kBwdData) {
      p.prim.execute(stream, {{DNNL_ARG_DIFF_DST, am}, {DNNL_ARG_WEIGHTS, bm},
                              {DNNL_ARG_DIFF_SRC, om}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      p.prim.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_DIFF_DST, bm},
                              {DNNL_ARG_DIFF_WEIGHTS, om}, {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    if (!direct) dnnl::reorder(om, user_out).execute(stream, om, user_out);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("sdl_jax dnnl convolution: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("sdl_jax dnnl convolution: out of memory for the scratchpad");
  }
  return ffi::Error::Success();
}

}  // namespace

#define SDL_DNNL_HANDLER(NAME, KIND)                                                       \
  static ffi::Error NAME##Impl(ffi::AnyBuffer a, ffi::AnyBuffer b,                         \
                               ffi::Result<ffi::AnyBuffer> out, int64_t sh, int64_t sw,    \
                               int64_t pt, int64_t pb, int64_t pl, int64_t pr,             \
                               int64_t groups, int64_t blocked) {                          \
    return Run(KIND, a, b, out, sh, sw, pt, pb, pl, pr, groups, blocked);                  \
  }                                                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, NAME##Impl,                                          \
                                ffi::Ffi::Bind()                                           \
                                    .Arg<ffi::AnyBuffer>()                                 \
                                    .Arg<ffi::AnyBuffer>()                                 \
                                    .Ret<ffi::AnyBuffer>()                                 \
                                    .Attr<int64_t>("sh")                                   \
                                    .Attr<int64_t>("sw")                                   \
                                    .Attr<int64_t>("pt")                                   \
                                    .Attr<int64_t>("pb")                                   \
                                    .Attr<int64_t>("pl")                                   \
                                    .Attr<int64_t>("pr")                                   \
                                    .Attr<int64_t>("groups")                               \
                                    .Attr<int64_t>("blocked"));

SDL_DNNL_HANDLER(SdlDnnlConvFwd, kFwd)
SDL_DNNL_HANDLER(SdlDnnlConvBwdData, kBwdData)
SDL_DNNL_HANDLER(SdlDnnlConvBwdWeights, kBwdWeights)

// The identity, for sdl_jax.cpu.dnnl.stored: XLA cannot fuse through a custom call, so
// whatever reads the result reads the buffer the operand was stored in, rather than a
// fused recomputation of the operand from its own inputs. Called with the result aliasing
// the operand (input_output_aliases), it does nothing; it copies only where XLA gave it
// two buffers.
static ffi::Error SdlStoredImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (out->untyped_data() != x.untyped_data()) {
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(SdlStored, SdlStoredImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// The oneDNN version in use, major * 10000 + minor * 100 + patch (3.2.0: 30200).
extern "C" int SdlDnnlVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// 1 if oneDNN has non-reference bfloat16 kernels here for all three directions of a dense
// 3x3, a dense 1x1 and a depthwise 3x3 convolution (as the models use), else 0. Where the
// CPU lacks bfloat16 arithmetic oneDNN either has none or a reference one, far slower
// than float32.
extern "C" int SdlDnnlBf16() {
  try {
    for (int kind : {kFwd, kBwdData, kBwdWeights}) {
      //          kind  n  h  w   c   o kh kw ho wo sh sw pt pb pl pr  g  bf16 blocked
      for (const Key& key : {Key{kind, 2, 8, 8, 16, 16, 3, 3, 8, 8, 1, 1, 1, 1, 1, 1, 1, true,
                                 false},
                             Key{kind, 2, 8, 8, 16, 32, 1, 1, 8, 8, 1, 1, 0, 0, 0, 0, 1, true,
                                 false},
                             Key{kind, 2, 8, 8, 16, 16, 3, 3, 8, 8, 1, 1, 1, 1, 1, 1, 16,
                                 true, false}}) {
        if (Make(key).impl.find("ref") != std::string::npos) return 0;
      }
    }
  } catch (const dnnl::error&) {
    return 0;
  }
  return 1;
}
