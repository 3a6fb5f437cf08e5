// The JIT's counters, disk cache and warm-up, and the device queries.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "common.hpp"
#include "kiln/device.hpp"
#include "kiln/jit.hpp"

namespace kiln_python {

namespace {

nb::dict jit_stats() {
  const kiln::jit::Stats s = kiln::jit::stats();
  nb::dict d;
  d["compiles"] = s.compiles;
  d["disk_hits"] = s.disk_hits;
  d["memory_hits"] = s.memory_hits;
  d["disk_writes"] = s.disk_writes;
  d["corrupt_entries"] = s.corrupt_entries;
  d["compile_ms"] = s.compile_ms;
  d["disk_load_ms"] = s.disk_load_ms;
  return d;
}

nb::list list_cache() {
  std::vector<kiln::jit::CacheEntry> entries;
  {
    nb::gil_scoped_release release;
    entries = kiln::jit::list_cache();
  }
  nb::list result;
  for (const kiln::jit::CacheEntry& e : entries) {
    nb::dict d;
    d["path"] = e.path;
    d["kernel"] = e.kernel;
    d["arch"] = e.arch;
    d["bytes"] = e.bytes;
    d["valid"] = e.valid;
    result.append(d);
  }
  return result;
}

nb::dict warmup(const std::string& workload, const std::vector<std::string>& archs) {
  kiln::jit::WarmupResult r;
  {
    nb::gil_scoped_release release;
    r = kiln::jit::warmup(workload, archs);
  }
  nb::dict d;
  d["variants"] = r.variants;
  d["compiled"] = r.compiled;
  d["stored"] = r.stored;
  return d;
}

nb::dict measure_overheads(const std::string& workload, int device) {
  kiln::jit::Overheads o;
  {
    nb::gil_scoped_release release;
    o = kiln::jit::measure_overheads(workload, device);
  }
  nb::dict d;
  d["kernel"] = o.kernel;
  d["arch"] = o.arch;
  d["first_compile_ms"] = o.first_compile_ms;
  d["disk_load_ms"] = o.disk_load_ms;
  d["memory_hit_us"] = o.memory_hit_us;
  return d;
}

}  // namespace

void bind_jit(nb::module_& m) {
  m.def("cuda_device_count", &kiln::cuda_device_count);
  m.def("cuda_unavailable_reason", &kiln::cuda_unavailable_reason);
  m.def("cuda_arch", &kiln::cuda_arch, nb::arg("device"));
  m.def("workspace_peak_bytes", &kiln::workspace_peak_bytes, nb::arg("device"));
  m.def("reset_workspace_peak", &kiln::reset_workspace_peak, nb::arg("device"));

  m.def("jit_stats", &jit_stats, "Counters of the process-wide kernel cache.");
  m.def("jit_reset_stats", &kiln::jit::reset_stats);
  m.def("cache_dir", &kiln::jit::cache_dir,
        "The disk cache folder in use; '' when the cache is memory-only.");
  m.def("cache_writable", &kiln::jit::cache_writable,
        "Whether compiled kernels are stored in cache_dir() (false: read-only).");
  m.def("list_cache", &list_cache, "Entries of the disk cache: path, kernel, arch, bytes, valid.");
  m.def("clear_cache", &kiln::jit::clear_cache, nb::call_guard<nb::gil_scoped_release>(),
        "Removes every kiln entry from the disk and memory caches; returns the files removed.");
  m.def("workloads", &kiln::jit::workloads);
  m.def("warmup", &warmup, nb::arg("workload"), nb::arg("archs"),
        "Compiles and stores every kernel variant of `workload` for `archs`; needs no GPU.");
  m.def("measure_overheads", &measure_overheads, nb::arg("workload"), nb::arg("device"),
        "First compile, disk load and memory hit times of the JIT on `device`.");
  m.def("version", &kiln::jit::version);
}

}  // namespace kiln_python
