// oneDNN 3.2 alone: a 3x3 stride-1 SAME convolution's forward pass (kind 0) or input gradient
// (kind 1) with the output at eight offsets modulo 4096 bytes from the input (measured:
// buffer placement was not why calls ran slower inside the train step). Build and run:
//   V=$(python -c "import sys; print(sys.prefix)")
//   c++ -O2 -std=c++17 -I$V/include benchmarks/tools/csrc/alias.cc -o /tmp/alias -L$V/lib -Wl,-rpath,$V/lib -ldnnl
//   OMP_WAIT_POLICY=PASSIVE /tmp/alias KIND H C O       # e.g. 0 16 64 128; 1 32 32 64
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl;
using tag = memory::format_tag; using dt = memory::data_type;
int main(int argc, char** argv) {
  engine eng(engine::kind::cpu, 0); stream s(eng);
  int kind = atoi(argv[1]); long n=32, h=atol(argv[2]), c=atol(argv[3]), o=atol(argv[4]);
  memory::dims src={n,c,h,h}, dst={n,o,h,h}, wts={o,c,3,3};
  auto src_u = memory::desc(src, dt::f32, tag::nhwc), dst_u = memory::desc(dst, dt::f32, tag::nhwc);
  auto wany = memory::desc(wts, dt::f32, tag::any);
  auto fwd = convolution_forward::primitive_desc(eng, prop_kind::forward_training, algorithm::convolution_direct, src_u, wany, dst_u, {1,1},{1,1},{1,1});
  primitive prim; memory::desc wdesc; const char* impl;
  if (kind == 0) { prim = convolution_forward(fwd); wdesc = fwd.weights_desc(); impl = fwd.impl_info_str(); }
  else { auto pd = convolution_backward_data::primitive_desc(eng, algorithm::convolution_direct, src_u, wany, dst_u, {1,1},{1,1},{1,1}, fwd);
         prim = convolution_backward_data(pd); wdesc = pd.weights_desc(); impl = pd.impl_info_str(); }
  size_t sb = n*c*h*h*4, db = n*o*h*h*4;
  char* big = (char*)aligned_alloc(4096, sb + db + (1<<20) * 4);
  memset(big, 0, sb + db + (1<<20)*4);
  memory wm(wdesc, eng); memset(wm.get_data_handle(), 0, wdesc.get_size());
  printf("%s kind=%d h=%ld %ld->%ld\n", impl, kind, h, c, o);
  for (long shift : {0L, 64L, 128L, 256L, 512L, 1024L, 2048L, 3072L}) {
    char* a = big;                      // the input: src (fwd) or diff_dst (bwd)
    size_t abytes = kind == 0 ? sb : db;
    size_t boff = (abytes + 4095) / 4096 * 4096 + 4096 + shift;
    char* b = big + boff;               // the output
    for (int i = 0; i < abytes/4; ++i) ((float*)a)[i] = 1.0f * (i % 7);
    memory am(kind == 0 ? src_u : dst_u, eng, a), bm(kind == 0 ? dst_u : src_u, eng, b);
    std::vector<double> ts;
    for (int r = 0; r < 25; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      if (kind == 0) prim.execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, bm}});
      else prim.execute(s, {{DNNL_ARG_DIFF_DST, am}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, bm}});
      s.wait();
      ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    printf("  out - in = %4ld mod 4096: %.2f ms\n", shift, ts[ts.size()/2]);
  }
}
