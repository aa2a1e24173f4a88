// The threads that run the decode kernels' parallel loops (gemv.cpp, decode_step.cpp), in
// place of torch's OpenMP pool: `parallel_for(begin, end, grain, fn)` as at::parallel_for.
//
// Why a team of our own. A decode step is ~150 short loops (a few microseconds each), so
// the threads must stay awake between them; but when the step ends, a pipeline stage of
// the same machine computes next, and every thread still awake takes a core from it.
// libgomp keeps its threads spinning GOMP_SPINCOUNT `pause`s after each loop, a time
// that differs by an order of magnitude between CPUs (a `pause` is a few cycles on AMD's
// cores, ~140 on Intel's since Skylake): p2pserve's 10000 let a waiting stage yield on
// the EPYCs it was set on, but on an Intel Xeon a second stage on the same 2 cores ran at
// half the one stage's speed. Here an idle thread spins for a set time, SPIN, then
// sleeps, and a step's end parks the team at once (`park`), so the next stage finds every
// core free; a step's start wakes it (`wake`) while the first layer's norm runs.
//
// The loop's range is cut into one chunk a thread (at least `grain`, a multiple of it),
// claimed first come first served, and the caller returns when every chunk is done: a
// thread that wakes late (or was descheduled) finds its chunk done by the others, and
// nobody waits for it. Each output element is computed by one thread, so which thread
// takes which chunk never changes a result.
#include <ATen/Parallel.h>
#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace team {

// How long an idle thread spins for the next loop before it sleeps: far longer than the
// serial work between a step's loops (a norm, RoPE: microseconds), far shorter than a
// scheduler's time slice (milliseconds), which a spinning thread would take from another
// process's
constexpr auto SPIN = std::chrono::microseconds(100);

static inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() holds, SPIN at most; whether it holds
template <class Done>
static bool spin(Done done) {
  const auto until = std::chrono::steady_clock::now() + SPIN;
  for (int i = 1; !done(); ++i) {
    if (i % 64)
      relax();
    else if (std::chrono::steady_clock::now() > until)
      return false;
  }
  return true;
}

thread_local bool in_loop = false;  // this thread runs a chunk now: a nested loop runs serially

class Team {
 public:
  explicit Team(int workers) : workers_(workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { serve(); });
  }

  int size() const { return workers_ + 1; }
  bool try_lock() { return calls_.try_lock(); }
  void unlock() { calls_.unlock(); }

  // fn(b, e) over [begin, end) in chunks of `chunk` (at most 65535 of them), on this thread
  // and whichever workers come; the caller holds the lock (try_lock)
  template <class Fn>
  void run(int64_t begin, int64_t end, int64_t chunk, const Fn& fn) {
    call_ = [](const void* f, int64_t b, int64_t e) { (*static_cast<const Fn*>(f))(b, e); };
    fn_ = &fn;
    begin_ = begin, end_ = end, chunk_ = chunk;
    const uint64_t chunks = (end - begin + chunk - 1) / chunk;
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    claims_.store((((claims_.load(std::memory_order_relaxed) >> 32) + 1) << 32) | chunks << 16,
                  std::memory_order_release);
    publish(WORK);
    work();
    // the others finish within microseconds unless one was descheduled: then yield to it
    auto done = [&] { return done_.load(std::memory_order_acquire) == chunks; };
    if (!spin(done))
      while (!done()) std::this_thread::yield();
    if (error_) std::rethrow_exception(error_);
  }

  // Every worker spins for the next loop (wake), or sleeps until it (park); the caller holds
  // the lock
  void wake() { publish(WAKE); }
  void park() { publish(PARK); }

  // Ends the workers (a team of another size replaces this one); the caller holds the lock
  void stop() {
    publish(STOP);
    for (auto& t : threads_) t.join();
  }

 private:
  // what the last publish asked, in the low 2 bits of state_ (a count above them)
  enum Kind : uint64_t { WORK, WAKE, PARK, STOP };

  const int workers_;
  std::vector<std::thread> threads_;
  std::mutex calls_;  // one caller at a time; another runs its loops alone
  std::atomic<uint64_t> state_{PARK};
  std::mutex sleep_;
  std::condition_variable woken_;
  std::atomic<int> sleepers_{0};

  // The loop being run: written by its caller before it publishes claims_, read by a thread
  // only once it claimed a chunk, and not written again before every chunk is done. A
  // thread that comes late (woken, or descheduled) finds every chunk claimed, or another
  // loop's claims_, and touches nothing: the caller never waits for it.
  void (*call_)(const void*, int64_t, int64_t) = nullptr;
  const void* fn_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 1;
  std::atomic<uint64_t> claims_{0};  // the loop's count, its chunks, the next chunk: 32, 16, 16 bits
  std::atomic<uint64_t> done_{0};    // chunks finished
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;

  void publish(Kind kind) {
    state_.store(((state_.load(std::memory_order_relaxed) >> 2) + 1) << 2 | kind, std::memory_order_seq_cst);
    // a sleeping worker is parked already: waking it to park would cost a wake-up and, for
    // a moment, a core
    if (kind != PARK && sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      woken_.notify_all();
    }
  }

  // Runs chunks of the loop being run while any is unclaimed
  void work() {
    in_loop = true;
    for (uint64_t c = claims_.load(std::memory_order_acquire);;) {
      const uint64_t next = c & 0xffff, chunks = (c >> 16) & 0xffff;
      if (next >= chunks) break;
      if (!claims_.compare_exchange_weak(c, c + 1, std::memory_order_acquire)) continue;  // c reloaded
      const int64_t b = begin_ + static_cast<int64_t>(next) * chunk_;
      try {
        call_(fn_, b, std::min(end_, b + chunk_));
      } catch (...) {
        if (!failed_.exchange(true)) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
      c = claims_.load(std::memory_order_acquire);
    }
    in_loop = false;
  }

  void serve() {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "p2pserve team");  // as top, perf and gdb show it
#endif
    uint64_t seen = PARK;  // state_'s first value: a loop may be published before this thread runs
    for (;;) {
      auto changed = [&] { return state_.load(std::memory_order_seq_cst) != seen; };
      if ((seen & 3) == PARK || !spin(changed)) {
        std::unique_lock<std::mutex> lock(sleep_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        woken_.wait(lock, changed);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = state_.load(std::memory_order_acquire);
      switch (seen & 3) {
        case WORK:
          work();
          break;
        case STOP:
          return;
      }
    }
  }
};

// The process's team, sized to torch's thread count (which ranks/cores.py follows); a
// team of another size replaces it. Teams are never freed: a caller that read the old
// pointer may still try its lock, and a forked child (whose copy has no threads) just
// drops its parent's.
std::atomic<Team*> current{nullptr};

static Team* team_for(int threads) {
  Team* t = current.load(std::memory_order_acquire);
  if (t != nullptr && t->size() == threads) return t;
  static std::mutex resizing;
  std::lock_guard<std::mutex> lock(resizing);
  t = current.load(std::memory_order_acquire);
  if (t != nullptr && t->size() == threads) return t;
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { current.store(nullptr); });
    return true;
  }();
  (void)registered;
  if (t != nullptr && t->try_lock()) {  // a caller running a loop on it now keeps its threads
    t->stop();
    t->unlock();
  }
  current.store(t = new Team(threads - 1), std::memory_order_release);
  return t;
}

// The team to run a loop of `n` elements of at least `grain` each on, locked, or nullptr to
// run it on this thread: one thread, too few elements, a nested loop, or a loop of another
// caller running
static Team* lease(int64_t n, int64_t grain) {
  if (in_loop || n <= grain) return nullptr;
  const int threads = at::get_num_threads();
  if (threads < 2) return nullptr;
  Team* t = team_for(threads);
  return t->try_lock() ? t : nullptr;
}

// A leased team, unlocked when it goes
struct Lease {
  Team* team;
  ~Lease() {
    if (team != nullptr) team->unlock();
  }
};

template <class Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const Lease held{lease(n, grain)};
  Team* t = held.team;
  if (t == nullptr) return fn(begin, end);
  const int64_t share = (n + t->size() - 1) / t->size();
  t->run(begin, end, (share + grain - 1) / grain * grain, fn);
}

// At a decode step's start: the workers spin for its first loop rather than sleep through
// the time a wake-up takes. At its end: they sleep at once, leaving the cores to whatever
// runs next (another stage, the sampler).
static void wake() {
  const int threads = at::get_num_threads();
  if (threads < 2 || in_loop) return;
  Team* t = team_for(threads);
  if (t->try_lock()) t->wake(), t->unlock();
}
static void park() {
  Team* t = current.load(std::memory_order_acquire);
  if (t != nullptr && t->try_lock()) t->park(), t->unlock();
}

}  // namespace team
