// The emulator's runtime (csrc/simt.h): a launch runs its blocks one after another, in an order
// shuffled by the seed; a block's threads are fibers on this OS thread, resumed in a shuffled
// order until each suspends at a barrier or *_sync intrinsic or exits. A *_sync call completes when
// every lane of its mask has arrived at the same call (source line, times made there, mask); a
// __syncthreads when every thread of the block has. What a GPU would hang on or leave undefined
// is an error naming the kernel, the block, the lanes and the call, and so is a shared-memory
// race: two threads' accesses to an element, one a write, that no barrier orders (see Cell).
#include "simt.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <deque>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace simt {

// A shared array of a launch: where it is, its first cell in the race detector's shadow
// (Shadow::cells) and the block (serial) at whose start it was last poisoned.
struct SharedArray {
  void* p;
  size_t bytes, element_bytes;
  const char* name;
  size_t first_cell;
  uint64_t serial;
};

namespace {

uint64_t g_seed = 0;      // the scheduling seed (configure)
uint64_t g_launches = 0;  // launches since configure: each launch's order depends on both


constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kMaxStaticShared = 48 * 1024;

// ---- fibers: a context switch that keeps what the C++ ABI says a call keeps ----

#if defined(__x86_64__)
extern "C" void simt_switch(void** save_sp, void* load_sp);
// Pushes the callee-saved registers and the SSE/x87 control words, saves the stack pointer,
// loads the other one, pops its registers and returns into it.
asm(R"(
    .text
    .p2align 4
    .globl simt_switch
    .hidden simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch
)");

struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }

// A context that starts entry() on the stack [base, base + bytes): the frame simt_switch pops,
// with entry as its return address, placed so that entry starts with the stack aligned as after
// a call.
void make_context(Context& c, char* base, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  slot[0] = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
  for (int k = 1; k <= 6; ++k) slot[k] = 0;  // r15 .. rbp
  slot[7] = reinterpret_cast<uint64_t>(entry);
  slot[8] = 0;  // entry's return address: none
  c.sp = slot;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& c, char* base, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// Fiber stacks, kept for the OS thread's life; a guard page below each.
struct Stacks {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("simt emulator: cannot allocate a fiber stack");
      mprotect(p, kGuardBytes, PROT_NONE);
      stacks.push_back(static_cast<char*>(p) + kGuardBytes);
    }
    return stacks[i];
  }
};

enum class State { kReady, kWaitWarp, kWaitBlock, kDone };

const char* sync_name(Sync kind) {
  switch (kind) {
    case Sync::kSyncthreads: return "__syncthreads";
    case Sync::kSyncwarp: return "__syncwarp";
    case Sync::kShflIdx: return "__shfl_sync";
    case Sync::kShflXor: return "__shfl_xor_sync";
  }
  return "?";
}

struct Fiber {
  Context context;
  Coordinates coords;
  unsigned tid = 0;  // linear thread index in the block
  State state = State::kReady;
  // The pending call: what, where (source line), with which mask and argument.
  Sync kind = Sync::kSyncwarp;
  Site site{nullptr, 0};
  unsigned count = 0;  // how many times this lane has made the call at `site`, this one included
  std::vector<std::pair<Site, unsigned>> calls;  // per site: how many times this lane made it
  unsigned mask = 0;
  int arg = 0, width = 32;
  void* value = nullptr;
  size_t bytes = 0;
  unsigned char deposit[16];
  std::exception_ptr error;
  // The race detector's warp clocks: clock[l] is the latest clock of lane l of this warp that a
  // __syncwarp has ordered before this fiber's next access; clock[its own lane] is its own.
  uint32_t clock[32] = {};
};

struct Launch {
  std::string kernel;
  dim3 grid, block;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<unsigned> ready;
  Context scheduler;
  Fiber* running = nullptr;
  uint64_t rng = 0;
  uint64_t block_serial = 0;
  unsigned done = 0, at_barrier = 0;
  std::deque<SharedArray> shared;  // static shared memory declared in this launch

  uint64_t next_random() {  // xorshift64*
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
  }
};

// The race detector's record of one element of shared memory. Happens-before comes from
// barriers only: a __syncthreads orders every access before it before every access after it (the
// epoch), a __syncwarp the accesses of the lanes it names (the warp clocks: an access by lane l at
// clock s is ordered before a later one of lane m when m's clock[l] >= s). Shuffles order nothing.
// Two accesses of different threads, one a write, race unless ordered; the cell keeps the last
// write and the reads since, each thread's latest, which is enough: the orders are transitive.
struct Cell {
  uint64_t write_epoch = 0;  // the last write's epoch (0: none)
  uint32_t write_stamp = 0;  // the writer's own clock at the write
  unsigned writer = 0;
  Site write_site{nullptr, 0};
  uint64_t read_epoch = 0;  // the epoch of the reads since the last write (0: none)
  unsigned read_warp = 0;   // the warp of the reads kept per lane
  uint32_t read_stamp[32];  // per lane of read_warp: its clock at its latest read (0: none)
  Site read_site[32];
  bool far = false;  // whether a thread of another warp read too: far_reader, at far_site
  unsigned far_reader = 0;
  Site far_site{nullptr, 0};
};

// The cells of the running launch's shared arrays, and the epoch: it advances at the start of
// each block and at each completed __syncthreads, so that cells left by earlier blocks and
// launches count as ordered before anything now.
struct Shadow {
  std::vector<Cell> cells;
  uint64_t epoch = 0;
};

thread_local Launch* t_launch = nullptr;
thread_local Stacks t_stacks;
thread_local Shadow t_shadow;

std::string block_name(const dim3& b) {
  std::ostringstream s;
  s << "(" << b.x << ", " << b.y << ", " << b.z << ")";
  return s.str();
}

[[noreturn]] void fail(const Launch& L, const std::string& what) {
  std::ostringstream s;
  s << "simt emulator: kernel " << L.kernel;
  if (L.running != nullptr || !L.fibers.empty()) s << ", block " << block_name(L.fibers.front().coords.block_idx);
  s << ": " << what;
  throw std::runtime_error(s.str());
}

// "0-7, 9, 12-31": thread indices as ranges.
std::string ranges(const std::vector<unsigned>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    s << (i ? ", " : "") << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

// The threads of a warp that a mask names.
std::string lanes_of(unsigned warp, unsigned mask) {
  std::vector<unsigned> ids;
  for (unsigned l = 0; l < 32; ++l) {
    if (mask >> l & 1u) ids.push_back(warp * 32 + l);
  }
  return ranges(ids);
}

std::string where(const Fiber& f) {
  std::ostringstream s;
  if (f.state == State::kDone) {
    s << "exited";
  } else if (f.state == State::kWaitBlock || f.state == State::kWaitWarp) {
    s << "at " << sync_name(f.kind);
    if (f.state == State::kWaitWarp) s << "(mask 0x" << std::hex << f.mask << std::dec << ")";
    s << " of " << f.site.file << ":" << f.site.line << " (its call #" << f.count << " there)";
  } else {
    s << "running";
  }
  return s.str();
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

bool same_call(const Fiber& a, const Fiber& b) {
  return a.kind == b.kind && same_site(a.site, b.site) && a.count == b.count && a.mask == b.mask;
}

// Records that f arrives at a call at `site`: its count there.
void arrive(Fiber& f, Sync kind, Site site) {
  f.kind = kind;
  f.site = site;
  for (auto& c : f.calls) {
    if (same_site(c.first, site)) {
      f.count = ++c.second;
      return;
    }
  }
  f.calls.push_back({site, 1});
  f.count = 1;
}

Launch& launch_of_caller(const char* what) {
  if (t_launch == nullptr || t_launch->running == nullptr) {
    throw std::runtime_error(std::string("simt emulator: ") + what + " called outside a kernel");
  }
  return *t_launch;
}

// Suspends the running fiber until the scheduler resumes it.
void suspend(Launch& L) { switch_context(L.running->context, L.scheduler); }

[[noreturn]] void fiber_main() {
  Launch& L = *t_launch;
  Fiber& f = *L.running;
  try {
    (*L.body)();
  } catch (...) {
    f.error = std::current_exception();
  }
  f.state = State::kDone;
  switch_context(f.context, L.scheduler);
  std::abort();  // a finished fiber is never resumed
}

// A completed __syncwarp: every lane of `mask` takes the join of their clocks, then advances its
// own, so that what each did before is ordered before what each does after.
void order_lanes(Launch& L, unsigned warp, unsigned mask) {
  uint32_t join[32] = {};
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const uint32_t* clock = L.fibers[warp * 32 + l].clock;
    for (unsigned k = 0; k < 32; ++k) join[k] = std::max(join[k], clock[k]);
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    uint32_t* clock = L.fibers[warp * 32 + l].clock;
    std::copy(join, join + 32, clock);
    clock[l] = join[l] + 1;
  }
}

// The lanes of f's warp that its mask names: every one must be at the same call as f. Completes
// the call (exchanging values) when all have arrived; fails where a GPU would hang or be undefined.
void try_complete_warp(Launch& L, Fiber& f) {
  const unsigned warp = f.tid / 32, lane = f.tid % 32;
  const unsigned warp_threads = std::min(32u, static_cast<unsigned>(L.fibers.size()) - warp * 32);
  const unsigned valid = warp_threads == 32 ? 0xffffffffu : (1u << warp_threads) - 1u;
  if (!(f.mask >> lane & 1u)) {
    fail(L, std::string(sync_name(f.kind)) + ": thread " + std::to_string(f.tid) + "'s mask does not name itself");
  }
  if (f.mask & ~valid) {
    fail(L, std::string(sync_name(f.kind)) + ": thread " + std::to_string(f.tid) +
                "'s mask names lanes past the block's last thread");
  }
  if (f.kind != Sync::kSyncwarp && (f.width < 1 || f.width > 32 || (f.width & (f.width - 1)))) {
    fail(L, std::string(sync_name(f.kind)) + ": width " + std::to_string(f.width) + " is not a power of two <= 32");
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    const Fiber& o = L.fibers[warp * 32 + l];
    if (o.state == State::kReady) return;  // still running toward a call
    if (o.state == State::kWaitWarp && !same_call(o, f)) {
      return;  // at another call, which may still complete; if not, the block stalls (see stalled)
    }
    if (o.state != State::kWaitWarp) {  // exited, or at a barrier that waits for f: never here
      std::ostringstream s;
      s << sync_name(f.kind) << " of " << f.site.file << ":" << f.site.line << " (mask 0x" << std::hex << f.mask
        << std::dec << ") by thread " << f.tid << " names thread " << o.tid << ", which is " << where(o)
        << " (a GPU would hang or return undefined values); lanes named: " << lanes_of(warp, f.mask);
      fail(L, s.str());
    }
  }
  // Everyone is here: each lane's result from the deposits, then resume them.
  for (unsigned l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    Fiber& o = L.fibers[warp * 32 + l];
    if (o.kind != Sync::kSyncwarp) {
      unsigned src;
      if (o.kind == Sync::kShflIdx) {
        src = (l & ~static_cast<unsigned>(o.width - 1)) + (static_cast<unsigned>(o.arg) & (o.width - 1));
      } else {
        src = l ^ static_cast<unsigned>(o.arg);
        if (src >= 32 || (src / o.width) > (l / o.width)) src = l;  // a later segment: its own value
      }
      if (!(f.mask >> src & 1u)) {
        std::ostringstream s;
        s << sync_name(o.kind) << ": thread " << o.tid << " reads lane " << src << ", which the mask 0x" << std::hex
          << f.mask << std::dec << " does not name (undefined on a GPU)";
        fail(L, s.str());
      }
      std::memcpy(o.value, L.fibers[warp * 32 + src].deposit, o.bytes);
    }
  }
  if (f.kind == Sync::kSyncwarp) order_lanes(L, warp, f.mask);
  for (unsigned l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    Fiber& o = L.fibers[warp * 32 + l];
    o.state = State::kReady;
    L.ready.push_back(o.tid);
  }
}

void release_barrier(Launch& L) {
  for (Fiber& o : L.fibers) {
    if (!same_site(o.site, L.fibers.front().site) || o.count != L.fibers.front().count) {
      fail(L, "__syncthreads: thread " + std::to_string(o.tid) + " is " + where(o) + ", thread 0 " +
                  where(L.fibers.front()));
    }
  }
  for (Fiber& o : L.fibers) {
    o.state = State::kReady;
    L.ready.push_back(o.tid);
  }
  L.at_barrier = 0;
  ++t_shadow.epoch;
}

// Every thread's position, grouped: where each call is waited at, and by which threads.
[[noreturn]] void stalled(Launch& L) {
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (const Fiber& o : L.fibers) {
    const std::string at = where(o);
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == at; });
    if (it == groups.end()) {
      groups.push_back({at, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(o.tid);
  }
  std::ostringstream s;
  s << "no thread can proceed (a GPU would hang or return undefined values):";
  for (const auto& g : groups) s << " threads " << ranges(g.second) << " " << g.first << ";";
  fail(L, s.str());
}

void run_block(Launch& L, const dim3& block_idx) {
  const unsigned n = L.block.x * L.block.y * L.block.z;
  L.fibers.assign(n, Fiber());
  L.ready.clear();
  L.done = L.at_barrier = 0;
  ++L.block_serial;
  ++t_shadow.epoch;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = L.fibers[t];
    f.tid = t;
    f.clock[t % 32] = 1;
    f.coords = Coordinates{dim3(t % L.block.x, t / L.block.x % L.block.y, t / (L.block.x * L.block.y)), block_idx,
                           L.block, L.grid};
    make_context(f.context, t_stacks.get(t), kStackBytes, fiber_main);
    L.ready.push_back(t);
  }
  while (!L.ready.empty()) {
    const size_t pick = L.next_random() % L.ready.size();
    const unsigned tid = L.ready[pick];
    L.ready[pick] = L.ready.back();
    L.ready.pop_back();
    Fiber& f = L.fibers[tid];
    L.running = &f;
    switch_context(L.scheduler, f.context);
    L.running = nullptr;
    if (f.error) {
      try {
        std::rethrow_exception(f.error);
      } catch (const std::exception& e) {
        fail(L, "thread " + std::to_string(f.tid) + ": " + e.what());
      }
    }
    switch (f.state) {
      case State::kWaitWarp:
        try_complete_warp(L, f);
        break;
      case State::kWaitBlock:
        if (++L.at_barrier == n) release_barrier(L);
        break;
      case State::kDone:
        ++L.done;
        break;
      case State::kReady:
        break;
    }
  }
  if (L.done != n) stalled(L);
}

}  // namespace

void configure(uint64_t seed) {
  g_seed = seed;
  g_launches = 0;
}

const Coordinates& current() { return launch_of_caller("threadIdx/blockIdx").running->coords; }

DeviceGuard::DeviceGuard(const c10::Device& device) {
  if (!device.is_cpu()) throw std::runtime_error("simt emulator: emulated kernels take CPU tensors");
}

void warp_sync(Sync kind, unsigned mask, void* value, size_t bytes, int arg, int width, Site site) {
  Launch& L = launch_of_caller(sync_name(kind));
  Fiber& f = *L.running;
  f.state = State::kWaitWarp;
  arrive(f, kind, site);
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.value = value;
  f.bytes = bytes;
  if (bytes > 0) std::memcpy(f.deposit, value, bytes);
  suspend(L);
}

void syncthreads(Site site) {
  Launch& L = launch_of_caller("__syncthreads");
  Fiber& f = *L.running;
  f.state = State::kWaitBlock;
  arrive(f, Sync::kSyncthreads, site);
  suspend(L);
}

void kernel_assert_failed(const char* condition, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA_KERNEL_ASSERT failed: ") + condition + " (" + file + ":" +
                           std::to_string(line) + ")");
}

void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::ostringstream s;
    s << "a " << bytes << "-byte pack access at " << p << ", not " << bytes << "-byte aligned (a GPU faults)";
    throw std::runtime_error(s.str());
  }
}

const SharedArray* shared_declared(void* p, size_t bytes, size_t element_bytes, const char* name) {
  Launch& L = launch_of_caller("shared memory");
  size_t total = 0, cells = 0;
  SharedArray* entry = nullptr;
  for (auto& s : L.shared) {
    total += s.bytes;
    cells += s.bytes / s.element_bytes;
    if (s.p == p) entry = &s;
  }
  if (entry == nullptr) {
    total += bytes;
    if (total > kMaxStaticShared) {
      throw std::runtime_error("static shared memory of " + std::to_string(total) + " bytes, past the 48 KB limit");
    }
    L.shared.push_back({p, bytes, element_bytes, name, cells, 0});
    entry = &L.shared.back();
    if (t_shadow.cells.size() < cells + bytes / element_bytes) t_shadow.cells.resize(cells + bytes / element_bytes);
  }
  if (entry->serial != L.block_serial) {  // a new block: what it finds there is garbage
    std::memset(p, 0xff, bytes);
    entry->serial = L.block_serial;
  }
  return entry;
}

void shared_access(const SharedArray* array, const void* p, bool write, Site site) {
  Launch& L = launch_of_caller("shared memory");
  const Fiber& f = *L.running;
  const ptrdiff_t offset = static_cast<const char*>(p) - static_cast<const char*>(array->p);
  const size_t count = array->bytes / array->element_bytes;
  const ptrdiff_t index = offset / static_cast<ptrdiff_t>(array->element_bytes);
  const auto element = [&] { return std::string(array->name) + "[" + std::to_string(index) + "]"; };
  const auto at = [](Site s) { return std::string(s.file) + ":" + std::to_string(s.line); };
  if (offset < 0 || index >= static_cast<ptrdiff_t>(count)) {
    throw std::runtime_error((write ? "writes " : "reads ") + element() + " at " + at(site) + ", outside its " +
                             std::to_string(count) + " elements");
  }
  Cell& c = t_shadow.cells[array->first_cell + index];
  const uint64_t epoch = t_shadow.epoch;
  const unsigned warp = f.tid / 32;
  // Whether thread `tid`'s access at its clock `stamp`, in this epoch, is ordered before this one.
  const auto ordered = [&](unsigned tid, uint32_t stamp) {
    return tid == f.tid || (tid / 32 == warp && f.clock[tid % 32] >= stamp);
  };
  const auto race = [&](unsigned other, const char* other_did, Site other_site) {
    std::ostringstream s;
    s << (write ? "writes " : "reads ") << element() << " at " << at(site) << ", which thread " << other << " "
      << other_did << " at " << at(other_site) << " with no __syncthreads"
      << (other / 32 == warp ? ", nor a __syncwarp naming both," : "") << " in between (a shared-memory race)";
    throw std::runtime_error(s.str());
  };
  if (c.write_epoch == epoch && !ordered(c.writer, c.write_stamp)) race(c.writer, "wrote", c.write_site);
  if (!write) {
    if (c.read_epoch != epoch) {
      c.read_epoch = epoch;
      c.read_warp = warp;
      c.far = false;
      std::fill(c.read_stamp, c.read_stamp + 32, 0u);
    }
    if (warp == c.read_warp) {
      c.read_stamp[f.tid % 32] = f.clock[f.tid % 32];
      c.read_site[f.tid % 32] = site;
    } else if (!c.far) {
      c.far = true;
      c.far_reader = f.tid;
      c.far_site = site;
    }
    return;
  }
  if (c.read_epoch == epoch) {
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned reader = c.read_warp * 32 + l;
      if (c.read_stamp[l] != 0 && !ordered(reader, c.read_stamp[l])) race(reader, "read", c.read_site[l]);
    }
    // A reader of another warp than read_warp: f is in read_warp (else the loop failed), so not it.
    if (c.far) race(c.far_reader, "read", c.far_site);
  }
  c.write_epoch = epoch;
  c.write_stamp = f.clock[f.tid % 32];
  c.writer = f.tid;
  c.write_site = site;
  c.read_epoch = 0;
}

void run(const std::string& kernel, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  Launch L;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.body = &body;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  std::ostringstream bad;
  if (threads == 0 || threads > kMaxBlockThreads || block.x > 1024 || block.y > 1024 || block.z > 64) {
    bad << "block dimensions " << block_name(block) << " past the limits (at most 1024 threads; x, y <= 1024, z <= 64)";
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    bad << "grid dimensions " << block_name(grid) << " past the limits (x < 2^31, y, z <= 65535, none 0)";
  } else if (shared_bytes > 0) {
    bad << "dynamic shared memory (" << shared_bytes << " bytes) is not emulated";
  }
  if (!bad.str().empty()) throw std::runtime_error("simt emulator: kernel " + kernel + ": " + bad.str());
  if (t_launch != nullptr) throw std::runtime_error("simt emulator: a launch from inside a kernel");
  L.rng = (g_seed + 1) * 0x9E3779B97F4A7C15ULL ^ (++g_launches * 0xBF58476D1CE4E5B9ULL);
  if (L.rng == 0) L.rng = 1;
  std::vector<dim3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  for (size_t i = blocks.size(); i > 1; --i) std::swap(blocks[i - 1], blocks[L.next_random() % i]);
  t_launch = &L;
  try {
    for (const dim3& b : blocks) run_block(L, b);
  } catch (...) {
    t_launch = nullptr;
    throw;
  }
  t_launch = nullptr;
}

}  // namespace simt
