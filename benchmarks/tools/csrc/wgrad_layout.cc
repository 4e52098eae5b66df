// oneDNN 3.2 alone: a 3x3 stride-1 SAME convolution's weight gradient with x and dy in NHWC
// against oneDNN's own (blocked) layout, reorders from NHWC timed apart (measured:
// dnnl_route.blocked_weight_grad). Median of 15 calls each. Build and run:
//   V=$(python -c "import sys; print(sys.prefix)")
//   c++ -O2 -std=c++17 -I$V/include benchmarks/tools/csrc/wgrad_layout.cc -o /tmp/wg -L$V/lib -Wl,-rpath,$V/lib -ldnnl
//   OMP_WAIT_POLICY=PASSIVE /tmp/wg H C O               # e.g. 64 32 32; 56 64 64
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl;
using tag = memory::format_tag; using dt = memory::data_type;
double med(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size()/2]; }
int main(int argc, char** argv) {
  engine eng(engine::kind::cpu, 0); stream s(eng);
  long n=32, h=atol(argv[1]), c=atol(argv[2]), o=atol(argv[3]);
  memory::dims src={n,c,h,h}, dst={n,o,h,h}, wts={o,c,3,3};
  auto src_u = memory::desc(src, dt::f32, tag::nhwc), dst_u = memory::desc(dst, dt::f32, tag::nhwc);
  for (int any = 0; any < 2; ++any) {
    auto sd = any ? memory::desc(src, dt::f32, tag::any) : src_u;
    auto dd = any ? memory::desc(dst, dt::f32, tag::any) : dst_u;
    auto wany = memory::desc(wts, dt::f32, tag::any);
    auto fwd = convolution_forward::primitive_desc(eng, prop_kind::forward_training, algorithm::convolution_direct, sd, wany, dd, {1,1},{1,1},{1,1});
    auto pd = convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct, sd, wany, dd, {1,1},{1,1},{1,1}, fwd);
    memory xu(src_u, eng), du(dst_u, eng);
    memset(xu.get_data_handle(), 0, src_u.get_size()); memset(du.get_data_handle(), 0, dst_u.get_size());
    for (size_t i = 0; i < src_u.get_size()/4; ++i) ((float*)xu.get_data_handle())[i] = (i % 13) * 0.1f;
    for (size_t i = 0; i < dst_u.get_size()/4; ++i) ((float*)du.get_data_handle())[i] = (i % 7) * 0.1f;
    memory xm = pd.src_desc() == src_u ? xu : memory(pd.src_desc(), eng);
    memory dm = pd.diff_dst_desc() == dst_u ? du : memory(pd.diff_dst_desc(), eng);
    memory wm(pd.diff_weights_desc(), eng);
    auto prim = convolution_backward_weights(pd);
    std::vector<double> tr, tc;
    for (int r = 0; r < 15; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      if (xm != xu) reorder(xu, xm).execute(s, xu, xm);
      if (dm != du) reorder(du, dm).execute(s, du, dm);
      s.wait();
      auto t1 = std::chrono::steady_clock::now();
      prim.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dm}, {DNNL_ARG_DIFF_WEIGHTS, wm}});
      s.wait();
      auto t2 = std::chrono::steady_clock::now();
      tr.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      tc.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    }
    printf("h=%ld %ld->%ld %s impl=%s reorders %.2f ms, wgrad %.2f ms\n", h, c, o, any ? "any " : "nhwc", pd.impl_info_str(), med(tr), med(tc));
  }
}
